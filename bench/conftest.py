"""`pytest bench/`: throughput comparisons, measured side by side in one run (docs/DESIGN.md §6).

CPU runs use small shapes and are read as ratios; CUDA runs use the CRATE presets at 224 px and give
absolute numbers. Results go to bench/results/<device>_torch<v>_triton<v>[_<files>].json unless
--benchmark-json is given; bench/report.py turns them into the README's tables.
"""
import gc
import os
import platform
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# A plain `import ffcv` (bench_data.py) would set torch.set_num_threads(1) for the whole session.
try:
    from crate_fast.data._ffcv import require_ffcv

    require_ffcv()
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _free_memory():
    """Each case builds its own model or tensors; release them (and any failed case's frames) before the next."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_tag() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def versions() -> dict:
    import triton
    return {"torch": torch.__version__.split("+")[0], "triton": triton.__version__}


def pytest_configure(config):
    if config.getoption("benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        v = versions()
        files = [os.path.splitext(os.path.basename(a.split("::")[0]))[0] for a in config.args
                 if os.path.basename(a.split("::")[0]).startswith("bench_")]
        name = f"{device_tag()}_torch{v['torch']}_triton{v['triton']}" + (f"_{'-'.join(files)}" if files else "")
        os.makedirs(RESULTS, exist_ok=True)
        config.option.benchmark_json = os.path.join(RESULTS, name + ".json")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(versions())
    machine_info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["python"] = platform.python_version()
    if torch.cuda.is_available():
        machine_info["cuda"] = torch.version.cuda
