"""eventful_fx: run vision transformers on video by recomputing only the tokens that changed.

Public names: `compile` (wrap a model into an EventfulModule), `analyze` (which ops convert,
and why the others cannot), `backend` / `reset` / `compiled_modules` (the `torch.compile`
backend registered as "eventful").
"""
from .api import EventfulModule, FrameStats, compile
from .analysis import Report, analyze
from .backend import backend, compiled_modules, reset

__all__ = ["compile", "analyze", "backend", "reset", "compiled_modules", "EventfulModule", "FrameStats", "Report"]
