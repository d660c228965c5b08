"""Test session setup: Triton kernels run under the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined; crate_fast imports its Triton
modules lazily, so setting it here (after torch, before the kernels) is early enough.
"""
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests take each kernel's first admitted config instead of autotuning every new shape;
# test_gpu_shapes.py::test_every_admitted_config_is_correct runs all of them.
os.environ.setdefault("CRATE_FAST_AUTOTUNE", "0")

# fp32 comparisons mean real fp32: no TF32 matmuls on GPUs that would otherwise use them.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# FFCV, when installed, is imported through crate_fast's helper before any test module imports it: a
# plain `import ffcv` calls torch.set_num_threads(1) for the rest of the session (data/_ffcv.py).
try:
    from crate_fast.data._ffcv import require_ffcv

    require_ffcv()
    HAS_FFCV = True
except ImportError:
    HAS_FFCV = False

# Where Triton kernels run in this session: the GPU, or the CPU through the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_ffcv = pytest.mark.skip(reason="needs FFCV (./run.sh installs it where it can)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "ffcv" in item.keywords and not HAS_FFCV:
            item.add_marker(skip_ffcv)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float buffer the kernels allocate starts as NaN, so an unwritten element shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))
