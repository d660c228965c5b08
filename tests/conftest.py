"""Test session setup: Triton kernels run under the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined; crate_fast imports its Triton
modules lazily, so setting it here (after torch, before the kernels) is early enough.
"""
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile

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
    # The AOT check compiles every kernel configuration (about 6 minutes of both cores here). When the
    # session selects its test, the check starts now, niced, and uses the cores the other tests leave
    # idle (subprocess start-up, torchrun rendezvous, waits); its test runs last and reads the result.
    aot = [item for item in items if item.nodeid.startswith(AOT_TEST)]
    if aot:
        items[:] = [item for item in items if item not in aot] + aot
        start_aot_check()


# ------------------------------------------------------------------------------------------------
# The AOT check, run in the background (tests/test_aot_check.py reads it)
# ------------------------------------------------------------------------------------------------
AOT_TEST = "tests/test_aot_check.py"
_AOT = {}                      # "proc": the aot_check process, "dir": its JSON and output


def start_aot_check() -> None:
    """python -m crate_fast.kernels.aot_check --quiet --json DIR/aot.json, niced, in its own process group
    (its compile workers end with it), output to DIR/out.txt (a file, not a pipe nobody reads until the
    end); started once per session."""
    if _AOT:
        return
    _AOT["dir"] = tempfile.mkdtemp(prefix="crate_fast_aot_test_")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # compile real kernels
    env["TMPDIR"] = _AOT["dir"]        # its fresh Triton cache too, so that a killed check leaves nothing
    with open(os.path.join(_AOT["dir"], "out.txt"), "w") as out:
        _AOT["proc"] = subprocess.Popen(
            [sys.executable, "-m", "crate_fast.kernels.aot_check", "--quiet", "--json",
             os.path.join(_AOT["dir"], "aot.json")], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=lambda: os.nice(19))


def aot_check_result(timeout: float) -> tuple[int, str, str]:
    """(exit status, output, JSON path) of the session's AOT check (started now if collection did not),
    waiting at most `timeout` seconds (subprocess.TimeoutExpired past it)."""
    start_aot_check()
    code = _AOT["proc"].wait(timeout=timeout)
    with open(os.path.join(_AOT["dir"], "out.txt")) as f:
        return code, f.read(), os.path.join(_AOT["dir"], "aot.json")


def pytest_sessionfinish(session, exitstatus):
    if "proc" in _AOT and _AOT["proc"].poll() is None:       # the session ended first (-x, Ctrl-C)
        os.killpg(_AOT["proc"].pid, signal.SIGKILL)          # the check and its compile workers
        _AOT["proc"].wait()
    if "dir" in _AOT:
        shutil.rmtree(_AOT["dir"], ignore_errors=True)


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
