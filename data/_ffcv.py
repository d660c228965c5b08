"""Importing FFCV without its side effects on the process.

FFCV's ``Compiler.set_num_threads(n)`` sets numba's thread count *and* ``torch.set_num_threads(n)``.
FFCV calls it at import (n = 1), when a Loader is built and when each epoch starts (n = num_workers).
So after ``import ffcv`` PyTorch runs CPU matmuls on one core, and a CPU run with ``--workers 1``
trains at half speed on 2 cores (measured: 159 vs 276 img/s for the digits job). It also hands numba
``num_workers`` unchecked, and numba refuses more threads than cores with an error from deep inside
an epoch. ``require_ffcv()`` imports FFCV with PyTorch's thread count kept, and replaces that method
by one that caps numba's threads at what numba allows and hands PyTorch the count it had when the
loader was made, so FFCV's calls keep their place but no longer change the process's thread count.
"""
from __future__ import annotations

import os

import torch


def require_ffcv() -> None:
    """Import FFCV (a clear error if it is missing) and patch its thread handling, once. Each call also
    records PyTorch's current thread count as the one FFCV's later calls keep."""
    threads = torch.get_num_threads()
    try:
        import numba
        from ffcv.pipeline.compiler import Compiler
    except ImportError as e:
        raise ImportError("FFCV is not installed: run ./run.sh (as root it installs the Debian packages FFCV "
                          "builds against) or pass --loader torchvision") from e
    finally:
        torch.set_num_threads(threads)      # undo the import's torch.set_num_threads(1)
    Compiler.torch_threads = threads
    if getattr(Compiler, "_torch_threads_kept", False):
        return

    def set_num_threads(cls, n: int) -> None:
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(cls.num_threads)
        # FFCV's own call, still made where FFCV makes it (its epoch threads included: without it,
        # 8 of 25 two-rank test runs aborted at exit, vs 2 of 16 with FFCV's original), with the
        # count the caller had instead of num_workers.
        torch.set_num_threads(cls.torch_threads)

    Compiler.set_num_threads = classmethod(set_num_threads)
    Compiler._torch_threads_kept = True
