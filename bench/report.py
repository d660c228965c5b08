"""Turn bench/results/*.json into the README's tables.

    python bench/report.py                 # print the tables
    python bench/report.py --readme docs/RESULTS.md   # replace the block between the bench markers

GPU files give absolute numbers (img/s, ms, TFLOP/s, MFU, memory); CPU files give ratios only.
Every table names its device and the torch and Triton versions it was measured with.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load(results_dir: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        info = data.get("machine_info", {})
        runs.append({"path": path, "device": info.get("device", "?"), "torch": info.get("torch", "?"),
                     "triton": info.get("triton", "?"), "gpu": info.get("device", "cpu") != "cpu",
                     "benchmarks": data.get("benchmarks", [])})
    return runs


def _params(bench: dict) -> dict:
    return {**bench.get("params", {}), **bench.get("extra_info", {})}


def _head(run: dict) -> str:
    return f"{run['device']}, torch {run['torch']}, Triton {run['triton']} (`{os.path.basename(run['path'])}`)"


def model_tables(run: dict) -> list[str]:
    rows = defaultdict(dict)
    for b in run["benchmarks"]:
        if not b["name"].startswith(("test_train_step", "test_inference")):
            continue
        p = _params(b)
        mode = "train" if b["name"].startswith("test_train_step") else "infer"
        rows[(p["arch"], mode)][p["impl"]] = p
    if not rows:
        return []
    present = {impl for by_impl in rows.values() for impl in by_impl}
    impls = [i for i in ["reference", "torch", "triton", "compile", "graphs", "timm"] if i in present or i != "graphs"]
    what = "img/s (speed-up over `impl=\"reference\"`), bf16 autocast" if run["gpu"] else \
        "speed-up over `impl=\"reference\"`, fp32"
    out = [f"**Model throughput** ({_head(run)}); {what}; CRATE-MAE rows are pretraining steps", ""]
    for mode in ("train", "infer"):
        out += [f"| {mode} | " + " | ".join(impls) + " | best MFU | peak memory vs reference |",
                "|---|" + "---|" * (len(impls) + 2)]
        for (arch, m), by_impl in rows.items():
            ref = by_impl.get("reference", {}).get("img_per_s")
            if m != mode or (not run["gpu"] and ref is None):       # CPU tables are ratios to the reference
                continue
            cells = []
            for impl in impls:
                p = by_impl.get(impl)
                if p is None:
                    cells.append("")
                elif run["gpu"]:
                    speedup = f" ({p['img_per_s'] / ref:.2f}x)" if ref and impl != "reference" else ""
                    cells.append(f"{p['img_per_s']:,.0f}{speedup}")
                else:
                    cells.append(f"{p['img_per_s'] / ref:.2f}x" if ref else "")
            mfu = max((p.get("mfu") or 0 for p in by_impl.values()), default=0)
            mem = ""
            fast = by_impl.get("triton") or by_impl.get("torch")
            if "peak_mem_mb" in by_impl.get("reference", {}) and fast and "peak_mem_mb" in fast:
                mem = f"{fast['peak_mem_mb'] / by_impl['reference']['peak_mem_mb']:.2f}x ({fast['impl']})"
            elif "activation_mb" in by_impl.get("reference", {}) and fast:
                ratio = fast["activation_mb"] / by_impl["reference"]["activation_mb"]
                mem = f"{ratio:.2f}x activations ({fast['impl']})"
            mfu_cell = f"{100 * mfu:.1f}%" if run["gpu"] else "-"
            size = next(iter(by_impl.values()))
            where = (f"{size['img']} px" if "img" in size else "") + (f"/{size['patch']}" if "patch" in size else "")
            where = f"{where}, b{size['batch']}" if where else f"b{size['batch']}"
            out.append(f"| {arch} ({where}) | " + " | ".join(cells) + f" | {mfu_cell} | {mem} |")
        out.append("")
    return out


def kernel_tables(run: dict) -> list[str]:
    groups = defaultdict(dict)
    for b in run["benchmarks"]:
        m = re.match(r"test_(mssa|ista|odl)\[(fwd_bwd|fwd|bwd)-([^-]+)-", b["name"])
        if not m or m.group(2) != "fwd_bwd":
            continue
        p = _params(b)
        shape = "x".join(map(str, p.get("shape", [])))
        seconds = p.get("seconds_per_call", b["stats"]["median"])
        groups[(m.group(1), shape, p.get("dtype"))][m.group(3)] = (seconds, p.get("tflops"))
    if not groups:
        return []
    first = ["triton", "torch", "compile", "reference"]
    providers = sorted({prov for g in groups.values() for prov in g},
                       key=lambda s: (first.index(s) if s in first else len(first), s))
    graphed = any(_params(b).get("cuda_graph") for b in run["benchmarks"])
    unit = "ms (TFLOP/s)" if run["gpu"] else "speed-up over reference"
    unit += ", CUDA-graph replays (device time)" if graphed else ""
    out = [f"**Kernels, forward + backward** ({_head(run)}); {unit}", "",
           "| op | shape | dtype | " + " | ".join(providers) + " |", "|---|---|---|" + "---|" * len(providers)]
    for (op, shape, dtype), by in sorted(groups.items()):
        ref = by.get("reference", (None,))[0]
        cells = []
        for prov in providers:
            if prov not in by:
                cells.append("")
            elif run["gpu"]:
                t, tf = by[prov]
                cells.append(f"{t * 1e3:.3f} ({tf:.0f})")
            else:
                cells.append(f"{ref / by[prov][0]:.2f}x" if ref else "")
        out.append(f"| {op} | {shape} | {dtype} | " + " | ".join(cells) + " |")
    return out + [""]


def gpt_tables(run: dict) -> list[str]:
    """bench_gpt.py: the train step per provider against crate-lm's (tokens/s, saved activations), and
    decoding with the tied KV cache against crate-lm's generate."""
    steps = {_params(b)["provider"]: (b["stats"]["median"], _params(b)) for b in run["benchmarks"]
             if b["name"].startswith("test_gpt_train_step")}
    decode = {_params(b)["provider"]: (b["stats"]["median"], _params(b)) for b in run["benchmarks"]
              if b["name"].startswith("test_gpt_decode")}
    if "crate_lm" not in steps:
        return []
    base_s, base = steps["crate_lm"]
    out = [f"**CRATE-GPT train step** ({_head(run)}); d {base['dim']}, {base['depth']} layers, T {base['seq']}, "
           f"batch {base['batch']}; " + ("tokens/s" if run["gpu"] else "speed") + " and saved activations against "
           "crate-lm's modules", "", "| provider | step speed | saved activations |", "|---|---|---|"]
    for prov, (sec, q) in steps.items():
        speed = f"{base_s / sec:.2f}x" if not run["gpu"] else f"{q['tokens_per_s']:,.0f} ({base_s / sec:.2f}x)"
        mem = f"{q['activation_mb'] / base['activation_mb']:.2f}x" if "activation_mb" in q else ""
        out.append(f"| {prov} | {speed} | {mem} |")
    if "crate_lm" in decode and "torch" in decode:
        q = decode["torch"][1]
        out += ["", f"Decoding {q['new_tokens']} tokens after a {q['prompt']}-token prompt: the tied KV cache "
                f"{decode['crate_lm'][0] / decode['torch'][0]:.1f}x crate-lm's generate."]
    return out + [""]


def data_tables(run: dict) -> list[str]:
    rows = [(_params(b), b) for b in run["benchmarks"] if b["name"].startswith("test_loader")]
    if not rows:
        return []
    outputs = list(dict.fromkeys(p.get("output", "float") for p, _ in rows))
    table = {}
    for p, _ in rows:
        table.setdefault((p["loader"], p["workers"]), {})[p.get("output", "float")] = p["img_per_s"]
    base = table.get(next((k for k in table if k[0] == "torchvision"), None), {})
    out = [f"**Data loading, RandomResizedCrop {rows[0][0]['res']} px + flip** ({_head(run)}); images/s "
           "(x torchvision)", "", "| loader | workers | " + " | ".join(f"{o} batches" for o in outputs) + " |",
           "|---|---|" + "---|" * len(outputs)]
    for (loader, workers), by in table.items():
        cells = [f"{by[o]:,.0f} ({by[o] / base[o]:.2f}x)" if o in by and o in base else f"{by.get(o, 0):,.0f}"
                 for o in outputs]
        out.append(f"| {loader} | {workers} | " + " | ".join(cells) + " |")
    return out + [""]


def render(results_dir: str) -> str:
    runs = sorted(load(results_dir), key=lambda r: (not r["gpu"], r["path"]))
    lines = []
    for table in (model_tables, gpt_tables, kernel_tables, data_tables):   # model numbers first
        for run in runs:
            lines += table(run)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--readme", help="rewrite the block between the bench markers of this file")
    args = ap.parse_args(argv)
    text = render(args.results)
    if not args.readme:
        print(text)
        return 0
    with open(args.readme) as f:
        readme = f.read()
    if START not in readme or END not in readme:
        raise SystemExit(f"{args.readme} has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w") as f:
        f.write(f"{head}{START}\n{text}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
