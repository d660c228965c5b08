"""Data pipeline: .beton writer round trip, bad inputs, loaders (FFCV and torchvision), sharding."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
from crate_fast.data import check_beton, train_loader, val_loader  # noqa: E402
from crate_fast.data import loaders as L  # noqa: E402
from crate_fast.data.write_ffcv import main as write_main  # noqa: E402
from crate_fast.data.write_ffcv import write_beton, write_image_folder  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A small real ImageFolder: random crops of scikit-image's photographs, JPEG and PNG, 3 classes,
    plus one corrupt JPEG and one text file that must be skipped."""
    from skimage import data as skd

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


def test_writer_round_trip_counts_and_skips(beton):
    out, scan = beton
    assert scan.classes == ["astronaut", "chelsea", "coffee"]
    assert len(scan.samples) == 21
    reasons = {os.path.basename(p): why for p, why in scan.skipped}
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert "not an image" in reasons["notes.txt"] and "Error" in reasons["broken.jpg"]
    check_beton(out)


def test_loaders_shapes_dtypes_labels_ranges(beton):
    out, _ = beton
    val = val_loader(out, batch_size=8, img_size=32, num_workers=2)
    xs, ys = zip(*list(val))
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
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert ((x.double() - truth).abs() <= tol * truth.abs().clamp_min(1)).all()


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


def test_batches_are_fresh_memory(beton):
    """FFCV reuses its output buffers every few batches; the batches we hand out must not alias them."""
    out, _ = beton
    val = val_loader(out, batch_size=2, img_size=16, num_workers=1)
    kept = list(val)                                   # 11 batches, more than FFCV's buffer slots
    again = [x.clone() for x, _ in val]
    assert len(kept) == len(again) == 11
    assert all(torch.equal(a[0], b) for a, b in zip(kept, again))


def test_same_epoch_same_order_new_epoch_new_order(beton):
    out, _ = beton
    train = train_loader(out, batch_size=3, img_size=16, num_workers=1, seed=3)

    def labels(epoch):
        train.set_epoch(epoch)
        return torch.cat([y for _, y in train]).tolist()
    assert labels(0) == labels(0) and labels(0) != labels(1)


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
def test_sharding_covers_each_sample_once(monkeypatch, beton, n, world):
    """Validation shards partition the data set exactly; training shards are equal-sized and disjoint."""
    out, _ = beton
    idx = np.arange(n)
    seen_val, seen_train = [], []
    for rank in range(world):
        monkeypatch.setattr(L, "_rank_world", lambda r=rank: (r, world))
        seen_val += list(_order(L._shards(False, 0, True, False), idx, epoch=0))
        seen_train.append(list(_order(L._shards(True, 7, True, True), idx, epoch=4)))
    assert sorted(seen_val) == list(range(n))
    flat = sum(seen_train, [])
    assert len(set(flat)) == len(flat) == n // world * world and len({len(s) for s in seen_train}) == 1
    # And through the real FFCV loader, two ranks see disjoint halves of the validation set.
    labels = []
    for rank in range(world):
        monkeypatch.setattr(L, "_rank_world", lambda r=rank: (r, world))
        labels += torch.cat([y for _, y in val_loader(out, batch_size=4, img_size=16, num_workers=1,
                                                     distributed=True)]).tolist()
    assert sorted(labels) == [0] * 7 + [1] * 7 + [2] * 7


def _order(shards, indices, epoch):
    shards.indices = indices             # what FFCV's TraversalOrder.__init__ sets from the loader
    return shards.sample_order(epoch)


def test_torchvision_fallback_matches_ffcv_counts(image_folder):
    from crate_fast.data import LoaderOptions, build_loaders

    pytest.importorskip("torchvision")
    root = image_folder.parent / "split"
    os.makedirs(root, exist_ok=True)
    for s in ("train", "val"):
        if not (root / s).exists():
            os.symlink(image_folder, root / s)
    opts = LoaderOptions(batch_size=4, img_size=16, num_workers=0, device=torch.device("cpu"))
    tv = build_loaders(str(root), opts, loader="torchvision")
    assert tv.num_classes == 3 and tv.val.num_samples == 21 and len(tv.train) == 21 // 4
    x, y = next(iter(tv.val))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64


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


def test_digits_source_is_deterministic_and_real(tmp_path):
    from crate_fast.data.digits import digits_arrays, digits_betons
    a, b = digits_arrays(), digits_arrays()
    assert np.array_equal(a["val"][1], b["val"][1]) and len(a["val"][1]) == 359 and len(a["train"][1]) == 1438
    assert a["train"][0].shape[1:] == (32, 32, 3) and a["train"][0].dtype == np.uint8
    assert set(np.unique(a["train"][1])) == set(range(10))
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
