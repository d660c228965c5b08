"""Every Triton kernel configuration compiles for sm_80 and sm_90a without spills (no GPU needed)."""
import os
import subprocess
import sys


def test_aot_check_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    p = subprocess.run([sys.executable, "-m", "crate_fast.kernels.aot_check", "--quiet", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "0 with problems" in p.stdout
    import json
    results = json.load(open(out))
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
