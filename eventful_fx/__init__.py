"""eventful_fx: run vision transformers on video by recomputing only the tokens that changed.

Public names: `compile` (wrap a model into an EventfulModule), `EventfulModule`.
"""
from .api import EventfulModule, FrameStats, compile

__all__ = ["compile", "EventfulModule", "FrameStats"]
