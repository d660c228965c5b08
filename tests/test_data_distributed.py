"""Data preparation under torch.distributed (C31): two processes on CPU (gloo), as torchrun starts them.

Every rank used to convert (and download) the data itself: N ranks, N full conversions of the same
folder into the same cache entry. build_loaders now prepares once per node (local rank 0; the others
wait), and once per cache directory across nodes (a lock file in the cache). The ranks log to their
own files; the writer logs each .beton it writes, which is what is counted.
"""
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

WORLD = 2


def _images(folder, count: int, seed: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


def _rank(rank: int, root: str) -> None:
    """One rank: build the loaders of three cases, recording what each gave (or raised) in rank<r>.json."""
    from crate_fast.data import LoaderOptions, build_loaders
    from crate_fast.data.prepare import prepare_once
    from crate_fast.data.sources import _betons

    logging.basicConfig(filename=os.path.join(root, f"rank{rank}.log"), level=logging.INFO,
                        format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(root, 'store')}", rank=rank,
                            world_size=WORLD)
    opts = LoaderOptions(batch_size=2, img_size=8, num_workers=1, device=torch.device("cpu"), distributed=True)
    results = {}
    # One node: local ranks 0 and 1, through build_loaders as train.py calls it. Two nodes of one rank
    # each, sharing one cache (local rank 0 twice), and a folder whose conversion fails on local rank 0
    # (no image in train/): the preparation step alone (FFCV loaders take seconds to compile).
    for case, local, data in (("node", rank, "data"), ("nodes", 0, "data"), ("broken", rank, "broken")):
        os.environ["LOCAL_RANK"] = str(local)
        logging.getLogger("test").info("case %s", case)
        data, cache = os.path.join(root, data), os.path.join(root, f"cache-{case}")
        try:
            if case == "node":
                made = build_loaders(data, opts, cache_dir=cache)
                results[case] = [made.num_classes, made.train.num_samples, made.val.num_samples]
            else:
                paths, n = prepare_once(lambda data=data, cache=cache: _betons(data, "image_folder", cache, cache))
                results[case] = [n, *(sorted(os.path.basename(p) for p in paths.values()))]
        except Exception as e:  # noqa: BLE001 - the outcome is the result
            results[case] = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.ffcv
def test_data_is_converted_once_per_node_and_per_cache(tmp_path):
    root = str(tmp_path)
    for split, count in (("train", 6), ("val", 2)):
        for seed, cls in enumerate(("a", "b")):
            _images(os.path.join(root, "data", split, cls), count, seed)
            _images(os.path.join(root, "broken", split, cls), count, seed)
    for cls in ("a", "b"):                # train/ of the broken folder: text files only
        for name in os.listdir(os.path.join(root, "broken", "train", cls)):
            os.replace(os.path.join(root, "broken", "train", cls, name),
                       os.path.join(root, "broken", "train", cls, name + ".txt"))
    mp.spawn(_rank, args=(root,), nprocs=WORLD, join=True)
    results = [json.load(open(os.path.join(root, f"rank{r}.json"))) for r in range(WORLD)]
    logs = [open(os.path.join(root, f"rank{r}.log")).read().split("test: case ")[1:] for r in range(WORLD)]
    assert [r["node"] for r in results] == [[2, 6, 2]] * WORLD, results      # 12 train, 4 val images; 2 ranks
    assert [r["nodes"] for r in results] == [[2, "train.beton", "val.beton"]] * WORLD, results
    for i, case in enumerate(("node", "nodes")):
        said = [log[i] for log in logs]
        wrote = sum(s.count("crate_fast.data.writer: wrote ") for s in said)
        converting = sum(s.count("crate_fast.data.sources: converting ") for s in said)
        assert (wrote, converting) == (2, 1), said         # train.beton and val.beton, written once
        if case == "node":
            assert "converting" in said[0], "local rank 0 converts"
        cache = os.path.join(root, f"cache-{case}")
        entries = os.listdir(cache)
        assert len(entries) == 1 and sorted(os.listdir(os.path.join(cache, entries[0]))) == [
            "train.beton", "train.beton.classes.json", "val.beton", "val.beton.classes.json"]
    # local rank 0 fails: it raises its error, the rank that waited says so instead of trying again
    assert results[0]["broken"].startswith("ValueError: ") and "has class folders but no image" in results[0]["broken"]
    assert results[1]["broken"].startswith("RuntimeError: preparing the data failed on the local rank 0")
    assert "converting" not in logs[1][2]
