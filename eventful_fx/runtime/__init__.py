"""Runtime ops of eventful models: token gates, token buffers and attention modes.

Plain PyTorch modules with explicit per-stream state; they know nothing of FX or video.
"""
from .attention import DenseAttention, IncrementalAttention, QueryGatedAttention, RowGatedAttention
from .buffer import TokenBuffer
from .gate import TokenGate, gather_rows, gather_tokens
from .policy import Policy, Threshold, TopFraction, TopK
from .state import StatefulOp

__all__ = [
    "StatefulOp", "TopK", "TopFraction", "Threshold", "Policy", "TokenGate", "TokenBuffer",
    "gather_tokens", "gather_rows", "DenseAttention", "QueryGatedAttention", "IncrementalAttention",
    "RowGatedAttention",
]
