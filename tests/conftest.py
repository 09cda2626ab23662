"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Small nets: one intra-op thread is as fast on an idle machine and many times faster on a busy one,
    where every op of a multi-threaded torch waits at barriers for descheduled threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
