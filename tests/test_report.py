"""bench/report.py: README tables from pytest-benchmark JSON (GPU: absolute numbers; CPU: ratios)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import report  # noqa: E402


def _bench(name, median, **extra):
    return {"name": name, "stats": {"median": median}, "extra_info": extra}


def _write(path, device, benchmarks):
    with open(path, "w") as f:
        json.dump({"machine_info": {"device": device, "torch": "2.x", "triton": "3.x"}, "benchmarks": benchmarks}, f)


@pytest.fixture
def results(tmp_path):
    gpu = [
        _bench("test_train_step[crate_base-reference]", 0.1, arch="crate_base", impl="reference", batch=256,
               img_per_s=1000.0, mfu=0.05, peak_mem_mb=1000.0),
        _bench("test_train_step[crate_base-triton]", 0.04, arch="crate_base", impl="triton", batch=256,
               img_per_s=2500.0, mfu=0.125, peak_mem_mb=400.0),
        _bench("test_train_step[crate_base-graphs]", 0.03, arch="crate_base", impl="graphs", batch=256,
               img_per_s=3000.0, mfu=0.15, peak_mem_mb=500.0),
        # graphed kernel rows: the median is per replay of 10 calls, seconds_per_call is per call
        _bench("test_mssa[fwd_bwd-triton-bfloat16-B]", 0.01, shape=[2, 3, 5, 8], dtype="bfloat16", tflops=100.0,
               cuda_graph=True, seconds_per_call=0.001),
        _bench("test_mssa[fwd_bwd-sdpa_flash-bfloat16-B]", 0.02, shape=[2, 3, 5, 8], dtype="bfloat16", tflops=50.0,
               cuda_graph=True, seconds_per_call=0.002),
        _bench("test_mssa[fwd_bwd-sdpa_cudnn-bfloat16-B]", 0.015, shape=[2, 3, 5, 8], dtype="bfloat16",
               tflops=66.0, cuda_graph=True, seconds_per_call=0.0015),
    ]
    cpu = [
        _bench("test_train_step[crate_tiny-reference]", 0.2, arch="crate_tiny", impl="reference", batch=32,
               img_per_s=160.0, activation_mb=10.0),
        _bench("test_train_step[crate_tiny-torch]", 0.1, arch="crate_tiny", impl="torch", batch=32,
               img_per_s=320.0, activation_mb=7.0),
        _bench("test_gpt_train_step[crate_lm]", 0.5, provider="crate_lm", batch=8, seq=256, dim=256, depth=4,
               tokens_per_s=4096.0, activation_mb=128.0),
        _bench("test_gpt_train_step[recompute]", 0.4, provider="recompute", batch=8, seq=256, dim=256, depth=4,
               tokens_per_s=5120.0, activation_mb=64.0),
        _bench("test_gpt_decode[crate_lm]", 1.5, provider="crate_lm", prompt=512, new_tokens=32),
        _bench("test_gpt_decode[torch]", 0.1, provider="torch", prompt=512, new_tokens=32),
        _bench("test_loader_train_epoch[uint8-torchvision]", 1.0, loader="torchvision", output="uint8", workers=2,
               res=224, img_per_s=1000.0),
        _bench("test_loader_train_epoch[uint8-ffcv_recipe]", 0.2, loader="ffcv_recipe", output="uint8", workers=2,
               res=224, img_per_s=5000.0),
        _bench("test_loader_train_epoch[float-torchvision]", 1.0, loader="torchvision", output="float", workers=2,
               res=224, img_per_s=800.0),
        _bench("test_loader_train_epoch[float-ffcv_recipe]", 0.3, loader="ffcv_recipe", output="float", workers=2,
               res=224, img_per_s=2400.0),
    ]
    _write(tmp_path / "gpu.json", "NVIDIA H100", gpu)
    _write(tmp_path / "cpu.json", "cpu", cpu)
    return tmp_path


def test_gpu_tables_absolute_cpu_tables_ratios(results):
    text = report.render(str(results))
    lines = text.splitlines()
    assert "| crate_base (b256) | 1,000 |  | 2,500 (2.50x) |  | 3,000 (3.00x) |  | 15.0% | 0.40x (triton) |" in lines
    # the graphs column appears only in runs that have it
    assert "| crate_tiny (b32) | 1.00x | 2.00x |  |  |  | - | 0.70x activations (torch) |" in lines
    # kernel rows: per-call times of graph replays, providers in a fixed order
    assert "| op | shape | dtype | triton | sdpa_cudnn | sdpa_flash |" in lines
    assert "| mssa | 2x3x5x8 | bfloat16 | 1.000 (100) | 1.500 (66) | 2.000 (50) |" in lines
    assert any("CUDA-graph replays" in line for line in lines)
    assert "| ffcv_recipe | 2 | 5,000 (5.00x) | 2,400 (3.00x) |" in lines
    # CRATE-GPT: ratios to crate-lm's step and saved bytes, the decode ratio
    assert "| recompute | 1.25x | 0.50x |" in lines and "| crate_lm | 1.00x | 1.00x |" in lines
    assert any("the tied KV cache 15.0x crate-lm's generate" in line for line in lines)


def test_readme_block_is_replaced_and_a_missing_block_is_an_error(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\nrest\n")
    report.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text and "crate_base" in text
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench:start -->"):
        report.main(["--results", str(results), "--readme", str(bare)])
