"""Shared fixtures."""

from __future__ import annotations

import os

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


# Every verb run by the suite (in-process or as a subprocess) uses one intra-op thread: results that do not
# depend on what else runs on the machine, and no oversubscription. tests/test_threads.py covers the
# automatic choice with this variable removed.
os.environ["OMP_NUM_THREADS"] = "1"
