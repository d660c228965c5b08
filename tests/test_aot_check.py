"""Every Triton kernel configuration compiles for sm_80 and sm_90a without spills (no GPU needed).

The check runs as `python -m crate_fast.kernels.aot_check`, started by conftest.py when the session
collects this test (in the background, niced; this test runs last and waits for it)."""
import json

from conftest import aot_check_result


def test_aot_check_passes():
    code, output, path = aot_check_result(timeout=1200)
    assert code == 0, output[-8000:]
    assert "0 with problems" in output
    with open(path) as f:
        results = json.load(f)
    kernels = {r["job"]["kernel"] for r in results}
    assert kernels == {"mssa._mssa_fwd_kernel", "mssa._mssa_bwd_kernel", "mssa._mssa_bwd_delta_kernel",
                       "mssa._mssa_nonfinite_rows_kernel", "gemm._gemm_epilogue_kernel"}
    # Both attention kernels full and causal, for every dtype and head block.
    for kernel in ("mssa._mssa_fwd_kernel", "mssa._mssa_bwd_kernel"):
        variants = {(r["job"]["dtype"], r["job"]["constexprs"]["BLOCK_D"], r["job"]["constexprs"]["CAUSAL"])
                    for r in results if r["job"]["kernel"] == kernel}
        assert variants == {(dt, bd, c) for dt in ("fp16", "bf16", "fp32") for bd in (16, 32, 64, 128)
                            for c in (False, True) if not (dt == "fp32" and bd == 128)}
    # The GEMM is checked with ISTA's epilogue and ODL's four (five with the residual).
    epilogues = {r["job"]["constexprs"].get("EPILOGUE") for r in results if r["job"]["kernel"].startswith("gemm.")}
    assert epilogues == {"ista", "a1", "e", "a2", "out", "out_residual"}
    assert {r["job"]["arch"] for r in results} == {80, 90}
    # The 16-bit matrix work of 64-row tiles runs on Hopper's wgmma, never serialized.
    big = [r for r in results if r["job"]["arch"] == 90 and r["job"]["dtype"] == "bf16"
           and "delta" not in r["job"]["kernel"]                      # no matrix work there
           and r["job"]["constexprs"].get("BLOCK_M", r["job"]["constexprs"].get("BLOCK_J", 0)) >= 64]
    assert big and all(r["mma"] == "wgmma" and not r["wgmma_serialized"] for r in big)
