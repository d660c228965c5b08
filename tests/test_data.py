"""Data pipeline: .beton writer round trip, bad inputs, loaders (FFCV and torchvision), sharding, image
decoding, the converted-data cache, batch transforms.

Only the tests marked ffcv need FFCV; the rest (normalization, sample order, image decoding, the
torchvision fallback, digits arrays, argument errors) run without it.
"""
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import NORMALIZE_TOL

from crate_fast.data import (
    Images,
    RandAugment,
    check_beton,
    load_rgb,
    shard_indices,
    sharding,
    to_rgb_array,
    train_loader,
    val_loader,
)
from crate_fast.data import loaders as L
from crate_fast.data.fallback import ShardSampler, TorchvisionLoader, val_transform
from crate_fast.data.write_ffcv import main as write_main
from crate_fast.data.write_ffcv import write_beton, write_image_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A small real ImageFolder: random crops of scikit-image's photographs, JPEG and PNG, 3 classes,
    plus one corrupt JPEG and one text file that must be skipped."""
    skd = pytest.importorskip("skimage.data")

    root = tmp_path_factory.mktemp("folder")
    photos = {"astronaut": skd.astronaut(), "chelsea": skd.chelsea(), "coffee": skd.coffee()}
    rng = np.random.default_rng(0)
    for cls, img in photos.items():
        os.makedirs(root / cls)
        for i in range(7):
            h, w = rng.integers(60, 140, size=2)
            y, x = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(img[y:y + h, x:x + w]).save(root / cls / f"{i}.{ext}")
    good = (root / "coffee" / "1.jpg").read_bytes()
    (root / "coffee" / "broken.jpg").write_bytes(good[: len(good) // 3])      # truncated JPEG
    (root / "chelsea" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def beton(image_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("beton") / "small.beton")
    scan = write_image_folder(str(image_folder), out, workers=2, max_resolution=96, progress=False)
    return out, scan


def _noise_images(folder, count: int, seed: int, size=(20, 24), start: int = 0) -> None:
    """`count` random-noise PNGs folder/{start..}.png of size (H, W)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _live_in_group(pgid: int) -> list[int]:
    """Processes of group pgid that still run (zombies excluded)."""
    live = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat", "rb").read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            live.append(int(pid))
    return live


@pytest.mark.ffcv
def test_writer_round_trip_counts_and_skips(beton):
    out, scan = beton
    assert scan.classes == ["astronaut", "chelsea", "coffee"]
    assert len(scan.samples) == 21
    reasons = {os.path.basename(p): why for p, why in scan.skipped}
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert "not an image" in reasons["notes.txt"] and "Error" in reasons["broken.jpg"]
    check_beton(out)


@pytest.mark.ffcv
def test_loaders_shapes_dtypes_labels_ranges(beton):
    out, _ = beton
    val = val_loader(out, batch_size=8, img_size=32, num_workers=2)
    xs, ys = zip(*list(val), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (21, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert sorted(y.tolist()) == [0] * 7 + [1] * 7 + [2] * 7
    # ImageNet normalization of uint8 pixels: values within [(0 - mean) / std, (255 - mean) / std].
    assert -2.2 < x.min() < 0 < x.max() < 2.7 and x.std() > 0.3
    train = train_loader(out, batch_size=4, img_size=24, num_workers=2, dtype=torch.bfloat16)
    batches = list(train)
    assert len(batches) == len(train) == 21 // 4
    assert all(b[0].shape == (4, 3, 24, 24) and b[0].dtype == torch.bfloat16 for b in batches)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_matches_float64(layout, dtype):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 5, 7), generator=g, dtype=torch.uint8).contiguous(memory_format=layout)
    x = L.Normalize("cpu", dtype, L.IMAGENET_MEAN, L.IMAGENET_STD)(pixels)
    mean = torch.tensor(L.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(L.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    truth = (pixels.double() - mean) / std
    assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    # fp32: a few ulp; bf16: at most half an ulp of bf16 (2^-8 relative) on top of the fp32 result.
    tol = NORMALIZE_TOL[dtype]
    assert ((x.double() - truth).abs() <= tol * truth.abs().clamp_min(1)).all()


@pytest.mark.ffcv
def test_loaders_keep_torch_threads_and_cap_ffcv_threads(beton):
    """FFCV alone sets torch.set_num_threads(num_workers) at every epoch and crashes in numba when
    num_workers exceeds the cores (data/_ffcv.py)."""
    out, _ = beton
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for workers in (1, (os.cpu_count() or 1) + 2):
            val = val_loader(out, batch_size=8, img_size=16, num_workers=workers)
            assert sum(len(y) for _, y in val) == 21
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.ffcv
def test_batches_are_fresh_memory(beton):
    """FFCV reuses its output buffers every few batches; the batches we hand out (images and labels)
    must not alias them."""
    out, _ = beton
    val = val_loader(out, batch_size=2, img_size=16, num_workers=1)
    kept = list(val)                                   # 11 batches, more than FFCV's buffer slots
    again = [x.clone() for x, _ in val]
    assert len(kept) == len(again) == 11
    assert all(torch.equal(a[0], b) for a, b in zip(kept, again, strict=True))
    labels = [y.clone() for _, y in val]
    assert all(torch.equal(a[1], b) for a, b in zip(kept, labels, strict=True))


@pytest.mark.ffcv
def test_same_epoch_same_order_new_epoch_new_order(beton):
    out, _ = beton
    train = train_loader(out, batch_size=3, img_size=16, num_workers=1, seed=3)

    def labels(epoch):
        train.set_epoch(epoch)
        return torch.cat([y for _, y in train]).tolist()
    assert labels(0) == labels(0) and labels(0) != labels(1)


@pytest.mark.ffcv
def test_interrupted_write_leaves_no_beton(tmp_path):
    class Exploding:
        def __len__(self):
            return 50

        def __getitem__(self, i):
            if i == 30:
                raise KeyboardInterrupt("simulated interrupt")
            return np.full((8, 8, 3), i, np.uint8), i % 2
    out = tmp_path / "x.beton"
    with pytest.raises(RuntimeError, match="sample 30: KeyboardInterrupt"):
        write_beton(Exploding(), str(out), workers=2)
    assert list(tmp_path.iterdir()) == [], "no .beton and no temporary file may be left"


# Runs in a subprocess (a hang fails the test instead of blocking the suite): one write per case, each
# failing at sample 7 in its own way; prints "<case> <outcome>" lines, and the names of the shared
# memory FFCV's writer made into names.txt (the parent must free them when it stops the writer).
_FAILING_WRITES = r"""
import os, signal, sys, time
from multiprocessing import shared_memory
import numpy as np
from crate_fast.data.write_ffcv import write_beton

out_dir, names = sys.argv[1], sys.argv[2]
init = shared_memory.SharedMemory.__init__
def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    open(names, "a").write(self.name + "\n")
shared_memory.SharedMemory.__init__ = recording_init

class Failing:
    def __init__(self, case):
        self.case = case
    def __len__(self):
        return 40
    def __getitem__(self, i):
        if i == 7:
            if self.case == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.case == "stuck":
                time.sleep(3600)
            if self.case == "not_uint8":
                return np.zeros((8, 8, 3), np.uint16), 0
            if self.case == "thin":
                return np.zeros((1, 300, 3), np.uint8), 0
        return np.full((8, 8, 3), i, np.uint8), i % 2

for case in sys.argv[3:]:
    try:
        write_beton(Failing(case), os.path.join(out_dir, case + ".beton"), workers=2, stall_timeout=10)
        print(case, "wrote", flush=True)
    except RuntimeError as e:
        print(case, "RuntimeError:", e, flush=True)
"""


@pytest.mark.ffcv
def test_write_beton_never_hangs_on_a_failing_worker(tmp_path):
    """A writer process that is killed, stuck, or fails inside FFCV's encoder (not in the data set)
    ends the write with a clear error: before, FFCV's writer waited for it forever. Nothing is left:
    no .beton, no temporary file, no shared memory."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    names = tmp_path / "names.txt"
    cases = ["killed", "stuck", "not_uint8", "thin"]
    run = subprocess.run([sys.executable, "-c", _FAILING_WRITES, str(out_dir), str(names), *cases],
                         capture_output=True, text=True, timeout=240)
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert run.returncode == 0 and set(lines) == set(cases), run.stdout + run.stderr[-3000:]
    assert "writer process died after 7/40 samples" in lines["killed"] and "killed by signal 9" in lines["killed"]
    assert "no sample written for 10 s (7/40 done): a writer process is stuck" in lines["stuck"]
    assert "sample 7: ValueError: Image type has to be uint8" in lines["not_uint8"]
    assert "sample 7: ValueError: too thin: 300x1 px becomes 256x0 px" in lines["thin"]
    assert list(out_dir.iterdir()) == [], "no .beton and no temporary file may be left"
    made = names.read_text().split()
    assert len(made) == len(cases) and not [n for n in made if os.path.exists(f"/dev/shm/{n}")]


_STUCK_WRITE = r"""
import os, sys, time
import numpy as np
from crate_fast.data.write_ffcv import write_beton

class Stuck:
    def __len__(self):
        return 20
    def __getitem__(self, i):
        if i == 3:
            open(sys.argv[2], "w").write(str(os.getpgrp()))      # the writer's process group
            time.sleep(3600)
        return np.full((8, 8, 3), i, np.uint8), 0

write_beton(Stuck(), os.path.join(sys.argv[1], "x.beton"), workers=2)
"""


@pytest.mark.ffcv
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_writer_parent_leaves_no_process(tmp_path, sig):
    """A parent stopped by SIGTERM (timeout, a scheduler, torchrun) cleans up like Ctrl-C; one killed
    outright takes the writer's processes with it. Before, they waited forever as orphans."""
    out_dir, marker = tmp_path / "out", tmp_path / "pgid"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WRITE, str(out_dir), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        pgid = int(marker.read_text())
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == (128 + sig if sig == signal.SIGTERM else -sig)
        deadline = time.monotonic() + 30
        while _live_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _live_in_group(pgid) == [], "the writer's processes must not outlive its parent"
        if sig == signal.SIGTERM:
            assert list(out_dir.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.ffcv
def test_writer_cli_skips_thin_images_and_exits(tmp_path):
    """A 300x1 PNG made FFCV's resize fail in a writer process nobody watched, and the CLI never
    exited. Images with a side below 2 px at the stored size are now skipped and listed, whichever
    side is thin (2 px too: FFCV's center crop of a 1-px side aborts the loading process)."""
    src = tmp_path / "src"
    _noise_images(src / "a", 3, seed=0)
    _noise_images(src / "b", 3, seed=1)
    Image.fromarray(np.full((1, 300, 3), 128, np.uint8)).save(src / "a" / "wide.png")
    Image.fromarray(np.full((300, 1, 3), 128, np.uint8)).save(src / "b" / "tall.png")
    Image.fromarray(np.full((2, 400, 3), 128, np.uint8)).save(src / "b" / "strip.png")    # 256x1 when stored
    out = tmp_path / "out.beton"
    run = subprocess.run([sys.executable, "-m", "crate_fast.data.write_ffcv", str(src), str(out), "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote" in run.stdout and "6 images, 2 classes" in run.stdout and "skipped 3 files" in run.stdout
    for name, stored in (("wide.png", "256x0"), ("tall.png", "0x256"), ("strip.png", "256x1")):
        assert f"{name}: too thin" in run.stdout and f"becomes {stored} px" in run.stdout
    assert sum(len(y) for _, y in val_loader(str(out), batch_size=4, img_size=16, num_workers=1)) == 6


@pytest.mark.ffcv
def test_val_loader_refuses_images_too_small_for_its_center_crop(tmp_path):
    """FFCV's center crop of int(crop_pct * short side) = 0 px aborts the process (an OpenCV assertion
    in C++); such a .beton (e.g. written by another tool) is refused with a clear error instead."""
    strips = [(np.full((2, 40, 3), 100, np.uint8), 0)] * 3
    path = write_beton(strips, str(tmp_path / "strips.beton"), max_resolution=None, compress_probability=0.0)
    with pytest.raises(ValueError, match="short side of 2 px, too small for a center crop of crop_pct=0.4"):
        val_loader(path, batch_size=2, img_size=8, num_workers=1, crop_pct=0.4)
    assert sum(len(y) for _, y in val_loader(path, batch_size=2, img_size=8, num_workers=1, crop_pct=0.5)) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "no_classes", "no_images"])
def test_writer_bad_sources(tmp_path, case, capsys):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "no_classes":
        (src / "a.jpg").write_bytes(b"x")
    if case == "no_images":
        (src / "cat").mkdir()
        (src / "cat" / "readme.md").write_text("hi")
    assert write_main([str(src), str(tmp_path / "o.beton"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert {"missing": "does not exist", "empty": "no class folders", "no_classes": "no class folders",
            "no_images": "no image files"}[case] in err
    assert not (tmp_path / "o.beton").exists()


@pytest.mark.ffcv
def test_loader_bad_betons(beton, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        val_loader(str(tmp_path / "nope.beton"), batch_size=2)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable FFCV .beton"):
        val_loader(str(junk), batch_size=2)
    data = open(beton[0], "rb").read()
    cut = tmp_path / "cut.beton"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        train_loader(str(cut), batch_size=2)


@pytest.mark.parametrize("n,world", [(21, 2), (20, 2), (21, 3)])
def test_shard_indices_partition_and_order(n, world):
    """Validation shards partition the data set exactly; training shards are equal-sized and disjoint,
    cut from one seeded permutation per epoch; the torchvision sampler reads exactly these."""
    val = [shard_indices(n, epoch=0, shuffle=False, seed=0, rank=r, world=world, equal=False) for r in range(world)]
    assert sorted(np.concatenate(val).tolist()) == list(range(n))
    train = [shard_indices(n, epoch=4, shuffle=True, seed=7, rank=r, world=world, equal=True) for r in range(world)]
    flat = np.concatenate(train).tolist()
    assert len(set(flat)) == len(flat) == n // world * world and len({len(s) for s in train}) == 1
    assert all(s.dtype == np.int64 for s in train + val)
    other_epoch = shard_indices(n, epoch=5, shuffle=True, seed=7, rank=0, world=world, equal=True)
    other_seed = shard_indices(n, epoch=4, shuffle=True, seed=8, rank=0, world=world, equal=True)
    assert not np.array_equal(train[0], other_epoch) and not np.array_equal(train[0], other_seed)
    picked = np.arange(100, 100 + n)           # explicit indices are permuted the same way as 0..n-1
    assert np.array_equal(shard_indices(picked, epoch=4, shuffle=True, seed=7, rank=0, world=world, equal=True),
                          100 + train[0])
    sampler = ShardSampler(n, shuffle=True, seed=7, distributed=False, equal=True)
    sampler.epoch = 4
    assert list(sampler) == shard_indices(n, epoch=4, shuffle=True, seed=7, rank=0, world=1, equal=True).tolist()
    assert list(sampler) == shard_indices(n, epoch=5, shuffle=True, seed=7, rank=0, world=1, equal=True).tolist()
    for bad in (dict(rank=world), dict(seed=-1)):
        with pytest.raises(ValueError):
            shard_indices(n, **{**dict(epoch=0, shuffle=True, seed=0, rank=0, world=world, equal=True), **bad})


@pytest.mark.ffcv
@pytest.mark.parametrize("n,world", [(21, 2), (20, 2), (21, 3)])
def test_sharding_covers_each_sample_once(monkeypatch, beton, n, world):
    """Validation shards partition the data set exactly; training shards are equal-sized and disjoint."""
    out, _ = beton
    idx = np.arange(n)
    seen_val, seen_train = [], []
    for rank in range(world):
        monkeypatch.setattr(sharding, "rank_world", lambda r=rank: (r, world))
        seen_val += list(_order(L._shards(False, 0, True, False), idx, epoch=0))
        seen_train.append(list(_order(L._shards(True, 7, True, True), idx, epoch=4)))
    assert sorted(seen_val) == list(range(n))
    flat = sum(seen_train, [])
    assert len(set(flat)) == len(flat) == n // world * world and len({len(s) for s in seen_train}) == 1
    # And through the real FFCV loader, two ranks see disjoint halves of the validation set.
    labels = []
    for rank in range(world):
        monkeypatch.setattr(sharding, "rank_world", lambda r=rank: (r, world))
        labels += torch.cat([y for _, y in val_loader(out, batch_size=4, img_size=16, num_workers=1,
                                                     distributed=True)]).tolist()
    assert sorted(labels) == [0] * 7 + [1] * 7 + [2] * 7


def _order(shards, indices, epoch):
    shards.indices = indices             # what FFCV's TraversalOrder.__init__ sets from the loader
    return shards.sample_order(epoch)


@pytest.mark.ffcv
def test_ffcv_and_torchvision_loaders_read_the_same_order(tmp_path, monkeypatch):
    """Both loaders take their order from sharding.shard_indices: with the labels set to the sample
    ids, the same seed, epoch, rank and world give the same ids in the same order (before, FFCV
    permuted with numpy and torchvision with torch.randperm), also on a pass without set_epoch."""
    n, world, seed = 13, 2, 5
    images = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(n)]
    path = write_beton(list(zip(images, range(n), strict=True)), str(tmp_path / "ids.beton"), max_resolution=None,
                       compress_probability=0.0)
    tensors = [(torch.from_numpy(a).permute(2, 0, 1), i) for i, a in enumerate(images)]

    def ids(loader):
        return torch.cat([y for _, y in loader]).tolist()
    for rank in range(world):
        monkeypatch.setattr(sharding, "rank_world", lambda r=rank: (r, world))
        common = dict(batch_size=1, num_workers=0, device="cpu", dtype=torch.float32, distributed=True, seed=seed)
        ffcv_train = train_loader(path, img_size=8, flip=False, **{**common, "num_workers": 1})
        tv_train = TorchvisionLoader(tensors, train=True, drop_last=True, **common)
        for epoch in (0, 3):
            ffcv_train.set_epoch(epoch)
            tv_train.set_epoch(epoch)
            truth = shard_indices(n, epoch=epoch, shuffle=True, seed=seed, rank=rank, world=world, equal=True)
            assert ids(ffcv_train) == ids(tv_train) == truth.tolist()
        assert ids(ffcv_train) == ids(tv_train)                     # both went on to epoch 5
        ffcv_val = val_loader(path, img_size=8, crop_pct=1.0, **{**common, "num_workers": 1})
        tv_val = TorchvisionLoader(tensors, train=False, drop_last=False, **common)
        assert ids(ffcv_val) == ids(tv_val) == list(range(rank, n, world))


def test_batch_transform_runs_on_uint8_before_normalization():
    """A training loader's batch_transform gets the uint8 (B, 3, H, W) batch on the device, before
    normalization: RandAugment changes the pixels of the same samples (same order), and the result is
    still a normalized channels_last float batch within the normalized pixel range."""
    pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8), i) for i in range(12)]
    seen = []

    def record(images):
        seen.append((images.dtype, tuple(images.shape), images.device.type))
        return images

    def epoch(transform):
        loader = TorchvisionLoader(data, batch_size=4, train=True, num_workers=0, device="cpu", dtype=torch.float32,
                                   distributed=False, seed=1, drop_last=True, batch_transform=transform)
        return list(loader)
    plain, recorded, augmented = epoch(None), epoch(record), epoch(RandAugment(2, 14))
    assert seen == [(torch.uint8, (4, 3, 16, 16), "cpu")] * 3
    mean = torch.tensor(L.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(L.IMAGENET_STD).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std - 1e-5, (255 - mean) / std + 1e-5
    for (x0, y0), (x1, y1), (x2, y2) in zip(plain, recorded, augmented, strict=True):
        assert torch.equal(y0, y1) and torch.equal(y0, y2) and torch.equal(x0, x1)
        assert x2.shape == x0.shape and x2.dtype == x0.dtype and x2.is_contiguous(memory_format=torch.channels_last)
        assert ((x2 >= lo) & (x2 <= hi)).all()
    assert not torch.equal(torch.cat([x for x, _ in plain]), torch.cat([x for x, _ in augmented]))
    with pytest.raises(ValueError, match="for training loaders"):
        TorchvisionLoader(data, batch_size=4, train=False, num_workers=0, device="cpu", dtype=torch.float32,
                          distributed=False, seed=1, drop_last=False, batch_transform=record)


def test_randaugment_keeps_shape_dtype_layout():
    pytest.importorskip("torchvision")
    x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = RandAugment(2, 14)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(out, x)
    with pytest.raises(ValueError, match="uint8"):
        RandAugment()(x.float())


@pytest.mark.ffcv
def test_ffcv_train_loader_applies_batch_transform_to_uint8(beton):
    out, _ = beton
    seen = []

    def record(images):
        seen.append((images.dtype, tuple(images.shape), images.is_contiguous(memory_format=torch.channels_last)))
        return images
    train = train_loader(out, batch_size=4, img_size=16, num_workers=1, batch_transform=record)
    x, _ = next(iter(train))
    assert seen[0] == (torch.uint8, (4, 3, 16, 16), True) and x.dtype == torch.float32


def test_torchvision_fallback_matches_ffcv_counts(image_folder):
    from crate_fast.data import LoaderOptions, build_loaders

    pytest.importorskip("torchvision")
    root = image_folder.parent / "split"
    os.makedirs(root, exist_ok=True)
    for s in ("train", "val"):
        if not (root / s).exists():
            os.symlink(image_folder, root / s)
    opts = LoaderOptions(batch_size=4, img_size=16, num_workers=0, device=torch.device("cpu"),
                         batch_transform=RandAugment())
    tv = build_loaders(str(root), opts, loader="torchvision")
    assert tv.num_classes == 3 and tv.val.num_samples == 21 and len(tv.train) == 21 // 4
    x, y = next(iter(tv.val))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert tv.train.batch_transform is opts.batch_transform and tv.val.batch_transform is None


def test_val_transform_center_crop_pct():
    """timm's eval crop: the short side resized to img_size / crop_pct, then the center img_size."""
    pytest.importorskip("torchvision")
    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint64).reshape(40, 60, 3).astype(np.uint8))
    full = val_transform(40, crop_pct=1.0)(img)
    assert full.shape == (3, 40, 40) and torch.equal(full, torch.from_numpy(np.array(img)[:, 10:50]).permute(2, 0, 1))
    assert val_transform(32, crop_pct=0.8)(img).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_pct"):
        val_transform(32, crop_pct=1.5)


def test_train_and_val_class_folders_must_agree(tmp_path, image_folder):
    from crate_fast.data import LoaderOptions, build_loaders
    for split in ("train", "val"):
        os.symlink(image_folder, tmp_path / split)
    os.remove(tmp_path / "val")
    os.makedirs(tmp_path / "val" / "astronaut")
    opts = LoaderOptions(batch_size=2, img_size=16, num_workers=0, device=torch.device("cpu"))
    for loader in ("ffcv", "torchvision"):
        with pytest.raises(ValueError, match="different class folders.*chelsea, coffee"):
            build_loaders(str(tmp_path), opts, loader=loader, cache_dir=str(tmp_path / "cache"))


@pytest.mark.ffcv
def test_converted_folder_cache_follows_the_folder(tmp_path, caplog):
    """The cached .beton of a train/ + val/ folder pair is keyed by the folders' contents: after images
    and a class are added, or a file rewritten, the next build converts again (saying so) and drops
    the outdated entry. Before, training kept reading the old samples while num_classes changed."""
    from crate_fast.data import LoaderOptions, build_loaders

    data, cache = tmp_path / "data", tmp_path / "cache"
    for split, count in (("train", 4), ("val", 2)):
        for seed, cls in enumerate(("a", "b")):
            _noise_images(data / split / cls, count, seed=seed)
    opts = LoaderOptions(batch_size=2, img_size=16, num_workers=1, device=torch.device("cpu"))
    caplog.set_level(logging.INFO, logger="crate_fast.data")

    def build():
        caplog.clear()
        made = build_loaders(str(data), opts, cache_dir=str(cache))
        said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("crate_fast.data"))
        return made.num_classes, made.train.num_samples, made.val.num_samples, said
    classes, n_train, n_val, said = build()
    assert (classes, n_train, n_val) == (2, 8, 4) and f"converting {data} into" in said
    assert build()[:3] == (2, 8, 4) and build()[3] == ""                      # unchanged: reused, silently
    _noise_images(data / "train" / "a", 2, seed=5, start=4)
    for split, count in (("train", 3), ("val", 1)):
        _noise_images(data / split / "c", count, seed=6)
    classes, n_train, n_val, said = build()
    assert (classes, n_train, n_val) == (3, 13, 5)
    assert "changed since it was converted" in said and "removed the outdated conversion" in said
    assert len(os.listdir(cache)) == 1
    # The same names, rewritten: only the size or modification time can tell.
    _noise_images(data / "val" / "c", 1, seed=7, size=(30, 30))
    assert "changed since it was converted" in build()[3]


def test_load_rgb_maps_every_mode_to_8bit_rgb(tmp_path):
    """Each mode PIL opens becomes 8-bit RGB by its real range (before, PIL's convert('RGB') clipped
    16-bit pixels: 30000 became 255, not 30000 / 257 = 117), or is refused with the reason."""
    def saved(name, image, **kwargs):
        image.save(tmp_path / name, **kwargs)
        return tmp_path / name
    gray16 = np.full((24, 24), 30000, np.uint16)
    cases = {
        "I;16 png": (saved("g16.png", Image.fromarray(gray16)), 117),
        "I;16B tiff": (saved("g16b.tif", Image.fromarray(gray16.astype(">u2"))), 117),
        "F tiff": (saved("f.tif", Image.fromarray(np.full((4, 4), 0.25, np.float32))), 64),
        "L png": (saved("l.png", Image.new("L", (4, 4), 77)), 77),
        "LA png": (saved("la.png", Image.new("LA", (4, 4), (77, 0))), 77),        # alpha dropped
        "1 png": (saved("one.png", Image.new("1", (4, 4), 1)), 255),
    }
    assert Image.open(cases["I;16 png"][0]).mode == "I;16" and Image.open(cases["I;16B tiff"][0]).mode == "I;16B"
    for what, (path, value) in cases.items():
        rgb = load_rgb(path)
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and (rgb == value).all(), (what, rgb[0, 0])
    pgm = tmp_path / "g.pgm"                                   # 12-bit gray: PIL opens it as mode I
    pgm.write_bytes(b"P5\n3 1\n4095\n" + np.array([4095, 2000, 0], ">u2").tobytes())
    assert Image.open(pgm).mode == "I" and load_rgb(pgm)[0, :, 0].tolist() == [255, 125, 0]
    rgba = load_rgb(saved("rgba.png", Image.new("RGBA", (4, 4), (10, 20, 30, 0))))
    assert (rgba == np.array([10, 20, 30], np.uint8)).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    assert (load_rgb(saved("p.png", palette)) == np.array([200, 100, 50], np.uint8)).all()
    cmyk = load_rgb(saved("cmyk.tif", Image.new("CMYK", (4, 4), (0, 0, 0, 0))))
    assert (cmyk == 255).all()
    refused = {
        "int32.tif": (Image.fromarray(np.full((4, 4), 70000, np.int32)), "32-bit integer pixels"),
        "hdr.tif": (Image.fromarray(np.full((4, 4), 2.0, np.float32)), "outside \\[0, 1\\]"),
    }
    for name, (image, why) in refused.items():
        with pytest.raises(ValueError, match=why):
            load_rgb(saved(name, image))
    with pytest.raises(ValueError):
        to_rgb_array(Image.new("La", (4, 4)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_rgb_applies_exif_orientation(tmp_path, orientation):
    """Photos are stored as they are shown: each EXIF orientation's transform applied (before, the
    tag was ignored and a portrait photo taken with the camera turned was stored sideways)."""
    a = np.random.default_rng(0).integers(0, 256, (24, 48, 3), dtype=np.uint8)
    shown = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2), 6: np.rot90(a, -1),
             7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, 1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif.tobytes())
    assert np.array_equal(load_rgb(tmp_path / "o.png"), shown)


def test_load_rgb_turns_a_rotated_jpeg_upright(tmp_path):
    """The reported case: a 48x24 JPEG tagged Orientation=6 (shown turned 90 degrees clockwise) is
    24 px wide and 48 px tall, its left half (red) on top."""
    a = np.zeros((24, 48, 3), np.uint8)
    a[:, :24], a[:, 24:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "o6.jpg", exif=exif.tobytes(), quality=95)
    rgb = load_rgb(tmp_path / "o6.jpg").astype(int)
    assert rgb.shape == (48, 24, 3)
    assert (abs(rgb[:20] - [255, 0, 0]) < 8).all() and (abs(rgb[28:] - [0, 0, 255]) < 8).all()


@pytest.mark.ffcv
def test_writer_stores_images_as_shown(tmp_path):
    """Through the writer: the rotated JPEG is stored upright, the 16-bit PNG at 117, and a 32-bit
    TIFF (no known range) is skipped and listed."""
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    Image.fromarray(np.full((24, 24), 30000, np.uint16)).save(src / "b_gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((24, 48, 3), np.uint8)).save(src / "c_rotated.jpg", exif=exif.tobytes())
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(src / "a_int32.tif")
    out = str(tmp_path / "out.beton")
    scan = write_image_folder(str(tmp_path / "src"), out, workers=1, progress=False, max_resolution=None,
                              compress_probability=0.0)
    assert [os.path.basename(p) for p, _ in scan.samples] == ["b_gray16.png", "c_rotated.jpg"]
    assert [(os.path.basename(p), "32-bit integer" in why) for p, why in scan.skipped] == [("a_int32.tif", True)]
    from ffcv.reader import Reader

    reader = Reader(out)
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    assert meta["height"].tolist() == [24, 48] and meta["width"].tolist() == [24, 24]
    x, _ = next(iter(val_loader(out, batch_size=1, img_size=24, num_workers=1, crop_pct=1.0)))
    pixels = x * torch.tensor(L.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(L.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert (pixels - 117).abs().max() < 1e-3


def test_images_adapter_gives_one_form_from_any_source(tmp_path):
    """datasets.Images: paths, PIL images and arrays all come out as the same (H, W, 3) uint8 pixels
    (or RGB PIL images, with a transform applied last), labels as ints."""
    a = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    items = [(tmp_path / "a.png", np.int64(1)), (Image.fromarray(a), 2), (a, 3)]
    arrays = Images(items)
    assert len(arrays) == 3
    for i in range(3):
        image, label = arrays[i]
        assert np.array_equal(image, a) and image.dtype == np.uint8 and type(label) is int and label == i + 1
    pil, label = Images(items, form="pil", transform=lambda im: im.size)[0]
    assert pil == (5, 6) and label == 1
    with pytest.raises(ValueError, match="uint8 array"):
        Images([(a.astype(np.float32), 0)])[0]
    with pytest.raises(ValueError, match="form"):
        Images(items, form="tensor")


def test_digits_arrays_are_deterministic_and_real():
    from crate_fast.data.digits import digits_arrays
    a, b = digits_arrays(), digits_arrays()
    assert np.array_equal(a["val"][1], b["val"][1]) and len(a["val"][1]) == 359 and len(a["train"][1]) == 1438
    assert a["train"][0].shape[1:] == (32, 32, 3) and a["train"][0].dtype == np.uint8
    assert set(np.unique(a["train"][1])) == set(range(10))


@pytest.mark.ffcv
def test_digits_betons_are_written_once(tmp_path):
    from crate_fast.data.digits import digits_betons
    paths = digits_betons(str(tmp_path))
    mtime = os.path.getmtime(paths["train"])
    assert digits_betons(str(tmp_path)) == paths and os.path.getmtime(paths["train"]) == mtime   # reused


def test_data_argument_errors(tmp_path):
    from crate_fast.data.sources import kind_of
    with pytest.raises(FileNotFoundError, match="not a directory nor one of"):
        kind_of(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="expected train.beton"):
        kind_of(str(tmp_path))
    assert kind_of("cifar10") == "cifar10" and kind_of("digits") == "digits"


def test_torchvision_dataset_without_network_is_a_clear_error(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")
    from crate_fast.data import sources

    def offline(root, train, download):
        if download:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded.*copy torchvision's cifar10 files"):
        sources._torchvision_set("cifar10", str(tmp_path), train=True)


def _png(path, value: int = 0, size=(16, 16)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def test_scan_follows_symlinked_folders_once_as_torchvision(tmp_path):
    """C26: images under a symlinked subfolder of a class were left out, and listed nowhere. The scan
    now lists the files torchvision's ImageFolder lists (it walks with followlinks=True), each once per
    class: torchvision loops through a link cycle (each file again at every level, until the kernel's
    link limit) and lists a file reached by two ways twice. folder_fingerprint sees the same files."""
    tvd = pytest.importorskip("torchvision.datasets")
    from crate_fast.data.folders import folder_fingerprint, scan_image_folder

    root, extra = tmp_path / "train", tmp_path / "extra"
    for path in (root / "cat" / "a.png", root / "cat" / "sub" / "s.png", root / "dog" / "d.png",
                 extra / "x1.png", extra / "x2.png"):
        _png(path)
    os.symlink(extra, root / "cat" / "more")              # a symlinked subfolder of a class
    os.symlink("..", root / "cat" / "sub" / "back")       # a cycle: cat/sub/back is cat/
    os.symlink("a.png", root / "cat" / "b.png")           # a.png, reachable twice
    os.symlink(extra, root / "dog" / "again")             # the same folder in another class: listed there too
    truth = {(os.path.realpath(p), label) for p, label in tvd.ImageFolder(str(root)).samples}
    scan = scan_image_folder(str(root), progress=False)
    listed = [(os.path.realpath(p), label) for p, label in scan.samples]
    assert sorted(listed) == sorted(truth) and len(listed) == len(set(listed)) == 7
    assert scan.skipped == [], "nothing may be left out"
    before = folder_fingerprint(str(root))
    _png(extra / "x1.png", value=9, size=(17, 16))        # rewritten behind the link
    assert folder_fingerprint(str(root)) != before


@pytest.mark.ffcv
def test_beton_pair_written_from_different_class_folders_is_refused(tmp_path, caplog):
    """C30: train.beton from {ant, bee, cat} and val.beton from {ant, cat} (two write_ffcv calls) gave
    every val cat image label 1, bee in training, silently. Each .beton now records its class names
    (OUT.classes.json), and a pair whose names differ is refused, naming the classes and the fix; a
    pair without records loads with a warning that nothing could be checked."""
    from crate_fast.data import LoaderOptions, beton_classes, build_loaders
    from crate_fast.data.records import record_path

    src, betons = tmp_path / "src", tmp_path / "betons"
    for split, names in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for seed, cls in enumerate(names):
            _noise_images(src / split / cls, 2, seed=seed)

    def write(split):
        write_image_folder(str(src / split), str(betons / f"{split}.beton"), workers=1, progress=False,
                           max_resolution=None)
    write("train")
    write("val")
    opts = LoaderOptions(batch_size=2, img_size=16, num_workers=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"different class names \(only in train.beton: bee\).*empty folder.*"
                                         r"python -m crate_fast.data.write_ffcv"):
        build_loaders(str(betons), opts)
    os.makedirs(src / "val" / "bee")                      # the fix: the same class folders, one of them empty
    write("val")
    assert beton_classes(str(betons / "val.beton")) == ["ant", "bee", "cat"]
    made = build_loaders(str(betons), opts)
    assert made.num_classes == 3 and sorted(torch.cat([y for _, y in made.val]).tolist()) == [0, 0, 2, 2]
    # Without a usable record (none, or one of another file): loaded as before, with a warning.
    caplog.set_level(logging.WARNING, logger="crate_fast.data")
    os.remove(record_path(str(betons / "val.beton")))
    assert build_loaders(str(betons), opts).num_classes == 3
    assert "cannot check that train.beton and val.beton use the same class names: val.beton has no" in caplog.text
    caplog.clear()
    write("val")
    write_beton([(np.zeros((8, 8, 3), np.uint8), 0)] * 5, str(tmp_path / "other.beton"), max_resolution=None)
    os.replace(tmp_path / "other.beton", betons / "train.beton")    # replaced by a file its record does not describe
    assert beton_classes(str(betons / "train.beton")) is None
    build_loaders(str(betons), opts)
    assert "train.beton has no class-name record" in caplog.text


@pytest.mark.ffcv
def test_conversions_record_class_names(tmp_path, monkeypatch):
    """The digits and torchvision-set conversions record the class names they know; write_beton without
    names removes a record an earlier file left, and refuses names that do not cover the labels."""
    from crate_fast.data import beton_classes, digits, sources
    from crate_fast.data.records import record_path

    tiny = {s: (np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 9, 4])) for s in ("train", "val")}
    monkeypatch.setattr(digits, "digits_arrays", lambda: tiny)
    paths = digits.digits_betons(str(tmp_path / "cache"))
    assert all(beton_classes(p) == [str(d) for d in range(10)] for p in paths.values())

    class FakeCifar(list):
        classes = [f"class{i}" for i in range(10)]
    monkeypatch.setattr(sources, "_torchvision_set", lambda name, root, train: FakeCifar(
        [(Image.fromarray(np.full((8, 8, 3), i, np.uint8)), i) for i in range(4)]))
    paths, n = sources._betons("cifar10", "cifar10", str(tmp_path / "cache"), str(tmp_path / "root"))
    assert n == 10 and all(beton_classes(p) == FakeCifar.classes for p in paths.values())
    write_beton([(np.zeros((8, 8, 3), np.uint8), 1)] * 2, paths["val"], max_resolution=None)
    assert not os.path.exists(record_path(paths["val"]))
    with pytest.raises(ValueError, match="do not fit the 1 class names"):
        write_beton([(np.zeros((8, 8, 3), np.uint8), 1)] * 2, str(tmp_path / "x.beton"), classes=["only"])
    assert not os.path.exists(tmp_path / "x.beton")


@pytest.fixture(scope="module")
def ids_beton(tmp_path_factory):
    """40 samples of 8x8 pixels whose label is their index (and pixel value), stored raw."""
    images = [(np.full((8, 8, 3), i, np.uint8), i) for i in range(40)]
    return write_beton(images, str(tmp_path_factory.mktemp("ids") / "ids.beton"), max_resolution=None,
                       compress_probability=0.0)


def _epoch_threads():
    return [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"]


@pytest.mark.ffcv
def test_breaking_out_of_an_ffcv_epoch_leaks_no_thread(ids_beton):
    """C24: a pass left before its last batch (train.py breaks out of the loop when the micro-batch
    count is not a multiple of --accum-steps) left FFCV's epoch thread blocked forever, holding its
    batch buffers (libffcv/ffcv#393): one thread and its memory more every epoch. The loader now stops
    it, wherever the pass is left (early, or with the last batches and FFCV's end marker queued), and
    the next epoch's order stays the one of shard_indices."""
    train = train_loader(ids_beton, batch_size=4, img_size=8, flip=False, num_workers=1, seed=2)
    assert len(train) == 10
    threads = threading.active_count()
    for epoch, read in enumerate((1, 2, 7, 8, 9, 2)):
        truth = shard_indices(40, epoch=epoch, shuffle=True, seed=2, rank=0, world=1, equal=True)
        labels = []
        for i, (_, y) in enumerate(train):
            labels += y.tolist()
            if i + 1 == read:
                break
        assert labels == truth[: 4 * read].tolist()
        assert _epoch_threads() == [] and threading.active_count() == threads, f"epoch {epoch}"
    next(iter(train))                                     # an iterator dropped after one batch
    assert _epoch_threads() == [] and threading.active_count() == threads
    x, y = zip(*train, strict=True)                       # epoch 7, whole, in order
    assert torch.cat(y).tolist() == shard_indices(40, epoch=7, shuffle=True, seed=2, rank=0, world=1,
                                                  equal=True).tolist()
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (L.IMAGENET_STD, L.IMAGENET_MEAN))
    pixels = torch.cat(x) * std + mean                    # each image's pixels are its label
    assert torch.allclose(pixels[:, :, 0, 0], torch.cat(y).float().view(-1, 1).expand(-1, 3), atol=1e-3)
    assert _epoch_threads() == []


@pytest.mark.ffcv
def test_ffcv_set_resolution_from_the_next_pass(ids_beton):
    """The FFCV loader's set_resolution (train.py --progressive): the next pass decodes at the new size;
    a loader made without progressive=True (compiled once) and an evaluation loader refuse it."""
    train = train_loader(ids_beton, batch_size=8, img_size=8, num_workers=1, progressive=True)
    assert next(iter(train))[0].shape == (8, 3, 8, 8)
    train.set_resolution(6)
    assert all(x.shape == (8, 3, 6, 6) for x, _ in train)
    with pytest.raises(RuntimeError, match="progressive=True"):
        train_loader(ids_beton, batch_size=8, img_size=8, num_workers=1).set_resolution(6)
    with pytest.raises(RuntimeError, match="training loaders"):
        val_loader(ids_beton, batch_size=8, img_size=8, num_workers=1).set_resolution(6)


@pytest.mark.parametrize("workers", [0, 1])
def test_torchvision_and_synthetic_loaders_set_resolution(workers):
    """C23: train.py --progressive calls train.set_resolution(res), which only the FFCV loader had
    (AttributeError with --loader torchvision and with --data synthetic). Both now take it with the
    FFCV loader's meaning: the training crop size from the next pass on (a pass under way keeps its
    size), also with DataLoader workers that persist between passes."""
    pytest.importorskip("torchvision")
    from crate_fast.data import LoaderOptions, build_loaders
    from crate_fast.data.fallback import train_transform

    data = Images([(np.full((20, 24, 3), i, np.uint8), i) for i in range(8)], "pil", train_transform(16))
    train = TorchvisionLoader(data, batch_size=4, train=True, num_workers=workers, device="cpu",
                              dtype=torch.float32, distributed=False, seed=0, drop_last=True)
    under_way = iter(train)
    assert next(under_way)[0].shape == (4, 3, 16, 16)
    train.set_resolution(8)
    assert next(under_way)[0].shape == (4, 3, 16, 16)
    del under_way
    for _ in range(2):
        batches = list(train)
        assert len(batches) == 2 and all(x.shape == (4, 3, 8, 8) for x, _ in batches)
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    val = TorchvisionLoader(data, batch_size=4, train=False, num_workers=0, device="cpu", dtype=torch.float32,
                            distributed=False, seed=0, drop_last=False)
    with pytest.raises(RuntimeError, match="training loaders"):
        val.set_resolution(8)
    opts = LoaderOptions(batch_size=2, img_size=16, num_workers=0, device=torch.device("cpu"), synthetic_steps=3)
    synthetic = build_loaders("synthetic", opts).train
    under_way = iter(synthetic)
    assert next(under_way)[0].shape == (2, 3, 16, 16)
    synthetic.set_resolution(8)
    assert next(under_way)[0].shape == (2, 3, 16, 16)
    x, y = next(iter(synthetic))
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (2,)


def test_imagenet_statistics_have_one_home():
    """The 0-1 statistics (timm's names) and the 0-255 ones the loaders use are the same numbers."""
    from crate_fast import data

    assert data.IMAGENET_DEFAULT_MEAN == (0.485, 0.456, 0.406) and data.IMAGENET_DEFAULT_STD == (0.229, 0.224, 0.225)
    assert data.IMAGENET_MEAN == tuple(255 * m for m in data.IMAGENET_DEFAULT_MEAN) == L.IMAGENET_MEAN
    assert data.IMAGENET_STD == tuple(255 * s for s in data.IMAGENET_DEFAULT_STD) == L.IMAGENET_STD


def test_the_text_corpus_parse_survives_another_threads_parse_during_a_collection():
    """CPython 3.11's AST constructor counts its recursion in interpreter-wide state. Here a collection
    during the conversion runs finalizers that release the GIL while a second thread parses: a plain
    ast.parse then raises SystemError "AST constructor recursion depth mismatch" on 3.11.7 (it failed a CI
    run in pydocs_text). parse_source must give the same tree as a quiet ast.parse, every time."""
    import argparse
    import ast
    import gc

    from crate_fast.data.text import parse_source

    with open(argparse.__file__, encoding="utf-8") as f:
        source = f.read()
    expected = ast.dump(ast.parse(source))

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            time.sleep(0)                       # releases the GIL inside the collection

    stop = threading.Event()

    def parse_elsewhere():
        while not stop.is_set():
            ast.parse("x = f(1) + 2")

    other = threading.Thread(target=parse_elsewhere, daemon=True)
    other.start()
    threshold = gc.get_threshold()
    gc.set_threshold(50)                        # collect often, so that one lands inside each conversion
    try:
        for _ in range(4):
            for _ in range(100):
                Cycle()
            assert ast.dump(parse_source(source)) == expected
    finally:
        gc.set_threshold(*threshold)
        stop.set()
        other.join()
    assert gc.isenabled()
