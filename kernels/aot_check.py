"""Ahead-of-time resource check of every Triton kernel configuration, no GPU needed.

    python -m crate_fast.kernels.aot_check [--arch 80 90] [--jobs N] [--json OUT.json]

Compiles each kernel x autotune config x dtype x head dim and causal mask (MSSA) or epilogue (gemm.py:
ISTA, ODL) for sm_80 and sm_90a with ``triton.compile``, reads the ``ptxas -v`` log of the cubin Triton
builds (Triton's own ptxas flags, so the numbers are those of the binary a GPU would load), and prints
registers, spill bytes, shared memory and (sm_90a) whether the matrix work uses wgmma and whether ptxas
had to serialize it (warning C7511). Every run compiles into a fresh private Triton cache, so ptxas runs
(and logs) for every configuration. Exits non-zero on a compile error, a register spill,
or shared memory over the architecture's per-block limit.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

SMEM_LIMIT = {80: 166912, 90: 232448}          # max dynamic shared memory per block (A100, H100)
DTYPES = ("fp16", "bf16", "fp32")
GEMM = "gemm._gemm_epilogue_kernel"

# Kernel argument types are declared beside each kernel, in its module's AOT_SPECS (mssa.py, gemm.py):
# pointers in "ptr" get the data dtype (or the job's ptr_dtypes) unless listed in "fp32_ptr" or
# "i32_ptr"; "floats" are float scalars; every other non-constexpr argument is an i32, and those in
# "div16" are multiples of 16 at CRATE's shapes (strides of H*D-wide rows, widths C), so they get the
# divisibility hint the runtime would also give; token counts such as N = 197 do not.


@dataclass
class Job:
    kernel: str            # "module.function"
    arch: int
    dtype: str
    constexprs: dict
    num_warps: int
    num_stages: int
    label: str
    ptr_dtypes: dict = field(default_factory=dict)   # pointer args whose dtype differs from `dtype`
    float_type: str = "fp32"                          # torch.compile (inductor) passes float scalars as fp64


@dataclass
class Result:
    job: Job
    ok: bool = False
    registers: int = -1
    spill_bytes: int = -1
    shared: int = -1
    mma: str = "-"                     # matrix instruction: "wgmma", "mma.sync" or "-" (none)
    wgmma_serialized: bool = False
    error: str = ""
    problems: list = field(default_factory=list)


def _precision(dtype: str):
    return "ieee" if dtype == "fp32" else None


def jobs(archs=(80, 90)) -> list[Job]:
    """Every configuration the dispatchers can launch."""
    from crate_fast.kernels import gemm, mssa
    from crate_fast.kernels._dispatch import FP32_MAX_HEAD_DIM, MAX_HEAD_DIM
    from crate_fast.kernels._triton import admitted

    out = []
    for arch in archs:
        for dtype in DTYPES:
            for block_d in mssa.HEAD_BLOCKS:
                if block_d > (FP32_MAX_HEAD_DIM if dtype == "fp32" else MAX_HEAD_DIM):
                    continue                                    # refused by the dispatcher
                for even, causal in itertools.product((True, False), (False, True)):
                    # D == BLOCK_D (64), or padded (48 -> 64); full or causal attention
                    base = dict(BLOCK_D=block_d, EVEN_D=even, CAUSAL=causal, INTERP_BF16=False)
                    head = f"D{'=' if even else '<'}{block_d}{' causal' if causal else ''}"
                    for name, configs in (("_mssa_fwd_kernel", mssa.FWD_CONFIGS),
                                          ("_mssa_bwd_kernel", mssa.BWD_CONFIGS)):
                        fits = admitted(configs, dtype, arch, block_d, causal=causal)
                        if not fits:
                            out.append(Job(f"mssa.{name}", arch, dtype, {}, 0, 0, f"{head}: no config fits"))
                        extra = {"ONE_LOOP": dtype == "fp32"} if name == "_mssa_bwd_kernel" else {}
                        for cfg in fits:
                            out.append(Job(f"mssa.{name}", arch, dtype,
                                           {**base, **extra, **cfg.kwargs, "PRECISION": _precision(dtype)},
                                           cfg.num_warps, cfg.num_stages, f"{head} {_fmt(cfg.kwargs)}"))
                out.append(Job("mssa._mssa_bwd_delta_kernel", arch, dtype,
                               dict(BLOCK_D=block_d, BLOCK_M=mssa.DELTA_BLOCK_M), 4, 1, f"D<={block_d}"))
                for last in (True, False):               # the causal kernels' scans of w (last) and dO (first)
                    out.append(Job("mssa._mssa_nonfinite_rows_kernel", arch, dtype,
                                   dict(LAST=last, BLOCK_N=mssa.DELTA_BLOCK_M, BLOCK_D=block_d), 4, 1,
                                   f"D<={block_d} {'last' if last else 'first'}"))
            # The GEMM: every epilogue reads and writes the GEMM dtype; those on the residual stream
            # (ISTA's x, ODL's residual) also fp32 (16-bit GEMMs under autocast, an fp32 stream).
            fits = admitted(gemm.GEMM_CONFIGS, dtype, arch)
            if not fits:
                out.append(Job(GEMM, arch, dtype, {}, 0, 0, "no config fits"))
            for epilogue in gemm.EPILOGUES:
                for stream in (sorted({dtype, "fp32"}) if epilogue in gemm.STREAM_EPILOGUES else [dtype]):
                    for cfg in fits:
                        out.append(Job(GEMM, arch, dtype,
                                       {**cfg.kwargs, "EPILOGUE": epilogue, "RHS_T": epilogue in gemm.RHS_TRANSPOSED,
                                        "INTERP_BF16": False, "PRECISION": _precision(dtype)},
                                       cfg.num_warps, cfg.num_stages, f"{epilogue} x:{stream} {_fmt(cfg.kwargs)}",
                                       {"X": stream, "OUT": stream}))
    # Under torch.compile the same kernels are launched by inductor with fp64 float scalars: one job per
    # kernel (those with float arguments: for the others it would be the same binary) and epilogue or
    # causal mask.
    replicated = set()
    for j in [j for j in out if j.arch == 90 and j.dtype == "bf16" and j.constexprs and _floats(j.kernel)]:
        variant = (j.kernel, j.constexprs.get("EPILOGUE"), j.constexprs.get("CAUSAL"))
        if variant not in replicated:
            replicated.add(variant)
            out.append(dataclasses.replace(j, float_type="fp64", label=j.label + " fp64-scalars"))
    return out


def _floats(kernel: str) -> list[str]:
    """The float scalar arguments of "module.function" (its module's AOT_SPECS)."""
    module, fn = kernel.split(".")
    return importlib.import_module(f"crate_fast.kernels.{module}").AOT_SPECS[fn]["floats"]


def _fmt(kwargs: dict) -> str:
    return " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in kwargs.items() if k != "GROUP_M")


def run_job(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(job)
    if not job.constexprs:
        res.problems.append("no admitted config")
        return res
    try:
        module_name, fn_name = job.kernel.split(".")
        module = importlib.import_module(f"crate_fast.kernels.{module_name}")
        kernel = getattr(module, fn_name)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel   # unwrap autotune
        spec = module.AOT_SPECS[fn_name]
        sig, attrs = {}, {}
        for i, p in enumerate(fn.params):
            n = p.name
            if p.is_constexpr:
                sig[n] = "constexpr"
            elif n in spec["ptr"]:
                sig[n] = ("*fp32" if n in spec["fp32_ptr"] else "*i32" if n in spec.get("i32_ptr", ())
                          else f"*{job.ptr_dtypes.get(n, job.dtype)}")
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif n in spec["floats"]:
                sig[n] = job.float_type
            else:
                sig[n] = "i32"
                if n in spec["div16"]:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, job.constexprs, attrs)
        log = io.StringIO()              # Triton prints ptxas's log under TRITON_DUMP_PTXAS_LOG (main sets it)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                      options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
        log = log.getvalue()
        ptx = compiled.asm["ptx"]
        res.shared = compiled.metadata.shared
        res.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
        m = re.search(r"Used (\d+) registers", log)
        if not m:
            raise RuntimeError("no ptxas -v log from Triton's compile (a cached cubin, or a Triton without "
                               "TRITON_DUMP_PTXAS_LOG): run through main(), which compiles into a fresh cache")
        res.registers = int(m.group(1))
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        res.spill_bytes = sum(int(a) + int(b) for a, b in spills)
        res.wgmma_serialized = "C7511" in log or "C7515" in log
        if res.spill_bytes:
            res.problems.append(f"{res.spill_bytes} spill bytes")
        if res.shared > SMEM_LIMIT[job.arch]:
            res.problems.append(f"shared memory {res.shared} > {SMEM_LIMIT[job.arch]}")
        res.ok = not res.problems
    except Exception as e:  # report every failing config, not only the first
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        res.problems.append("compile error")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every result to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)   # compile real kernels, never interpreted stand-ins
    # The workers inherit both: Triton prints the log of the ptxas run it makes for each cubin, and a fresh
    # cache makes it run for every configuration (a cached cubin comes without its log).
    cache = tempfile.mkdtemp(prefix="crate_fast_aot_")
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)

    todo = jobs(tuple(args.arch))
    t0 = time.time()
    try:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(run_job, todo, chunksize=4))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    bad = [r for r in results if not r.ok]
    head = f"{'kernel':<28}{'arch':<8}{'dtype':<6}{'config':<34}{'regs':>5}{'spill':>6}{'smem':>8}  mma"
    print(head)
    for r in results:
        if args.quiet and r.ok:
            continue
        j = r.job
        mma = r.mma + (" (serialized!)" if r.wgmma_serialized else "")
        config = f"{j.label} w{j.num_warps}s{j.num_stages}"
        line = (f"{j.kernel.split('.')[1]:<28}{'sm_90a' if j.arch == 90 else 'sm_80':<8}{j.dtype:<6}"
                f"{config:<34}{r.registers:>5}{r.spill_bytes:>6}{r.shared:>8}  {mma}")
        print(line + (f"   <-- {', '.join(r.problems)} {r.error}" if r.problems else ""))
    # Triton issues wgmma for 16-bit dots whose tile has >= 64 rows per warpgroup; 32-row tiles (kept
    # for the short-sequence tail) and fp32 IEEE dots use mma.sync / FMA.
    n90 = [r for r in results if r.job.arch == 90 and r.job.dtype != "fp32" and r.mma != "-"]
    print(f"\n{len(results)} configurations compiled in {time.time() - t0:.0f}s; {len(bad)} with problems; "
          f"sm_90a 16-bit configs with matrix work: {sum(r.mma == 'wgmma' for r in n90)}/{len(n90)} on wgmma "
          f"(the rest have 32-row tiles), {sum(r.wgmma_serialized for r in n90)} serialized by ptxas")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "job": asdict(r.job)} for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
