"""Shared by every test: the built-in clip decoded once per run, and no state leaking between tests.

Tests import what they compare with from `helpers.py` and hand-written models from `models.py`.
"""
from __future__ import annotations

import functools

import pytest
import torch

from eventful_fx.backend import _modules as backend_modules
from eventful_fx.video import builtin_clip


@functools.lru_cache(maxsize=None)
def _clip(size: int, frames: int) -> torch.Tensor:
    return builtin_clip(size=size, max_frames=frames)


@pytest.fixture(scope="session")
def frames_of():
    """frames_of(size, n): the first n frames of the built-in clip at size x size, decoded once per run.
    Returns a copy: a test that edits its frames cannot change another test's."""
    return lambda size=224, n=8: _clip(size, n).clone()


@pytest.fixture(autouse=True)
def _isolated():
    """Thread count, grad mode and the eventful backends' module registry are restored after each test."""
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    backend_modules.clear()  # `compiled_modules()` must not return another test's modules
