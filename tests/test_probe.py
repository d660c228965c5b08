"""The linear probe (crate_fast.probe): features of every family, the scikit-learn fit on separable and real
data, distributed gathering, errors, the command line."""
import json
import sys

import numpy as np
import pytest
import torch

from crate_fast import create_model
from crate_fast.probe import extract_features, linear_probe
from crate_fast.probe.__main__ import main

TINY = dict(dim=32, depth=1, heads=2, img_size=16, patch_size=4)


def tiny(arch, **kw):
    torch.manual_seed(0)
    return create_model(arch, **TINY, **({} if arch.startswith("mae") else {"num_classes": 10}), **kw)


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def separable(n, dim=8, classes=4, seed=0):
    """(features (n, dim), labels) with labels = argmax of a fixed linear map, margin enforced."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))
    x = torch.randn(4 * n, dim, generator=gen)
    scores = x @ w
    top2 = scores.topk(2, dim=1).values
    x = x[(top2[:, 0] - top2[:, 1]) > 0.5][:n]          # keep points away from the decision boundaries
    return x, (x @ w).argmax(1)


def test_probe_separates_linearly_separable_features():
    """A CRATE-MAE whose pooled features are the first 8 pixels: labels a linear function of them."""
    model = tiny("mae_crate_tiny")
    model.pooled = lambda images, pool: images.flatten(1)[:, :8]
    (xt, yt), (xv, yv) = separable(400), separable(200, seed=1)
    as_images = lambda f: torch.cat([f, torch.zeros(len(f), 3 * 16 * 16 - 8)], 1).view(-1, 3, 16, 16)  # noqa: E731
    got = linear_probe(model, batches(as_images(xt), yt, 64), batches(as_images(xv), yv, 64), C=100.0)
    assert got["train_top1"] == 100.0 and got["val_top1"] >= 99.0
    assert (got["n_train"], got["n_val"], got["dim"], got["pool"]) == (400, 200, 8, "cls")
    assert got["seconds"] > 0 and 1 <= got["n_iter"] < 1000
    # Distributed: every rank's arrays concatenated (here one rank, seen twice).
    twice = linear_probe(model, batches(as_images(xt), yt, 64), batches(as_images(xv), yv, 64), C=100.0,
                         gather=lambda a: np.concatenate([a, a]))
    assert (twice["n_train"], twice["n_val"], twice["train_top1"]) == (800, 400, 100.0)


@pytest.mark.parametrize("arch", ["crate_tiny", "crate_alpha_tiny", "mae_crate_tiny"])
def test_features_of_every_family(arch):
    model = tiny(arch)
    x, y = torch.randn(10, 3, 16, 16), torch.arange(10)
    feats, labels = extract_features(model, batches(x, y, 4))
    assert feats.dtype == np.float32 and feats.shape == (10, 32)
    assert labels.dtype == np.int64 and labels.tolist() == list(range(10))
    assert model.training, "the model's mode is restored"
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        if arch.startswith("mae"):
            for pool in ("cls", "mean"):
                np.testing.assert_array_equal(extract_features(model, [(x, y)], pool)[0], model.pooled(x, pool).numpy())
        else:
            # The model's own pool gives exactly timm's pre-logits; the other one pools as the classifier would.
            np.testing.assert_array_equal(feats, model.forward_head(tokens, pre_logits=True).numpy())
            mean = extract_features(model, [(x, y)], "mean")[0]
            np.testing.assert_array_equal(mean, model.head_norm(tokens.mean(1)).numpy())


def test_classifier_mean_pool_equals_its_pre_logits():
    model = tiny("crate_tiny", pool="mean").eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_array_equal(extract_features(model, [(x, torch.zeros(5))], "mean")[0], want)


@pytest.mark.parametrize("arch", ["crate_tiny", "mae_crate_tiny"])
def test_random_model_on_digits(arch):
    """A random-init encoder on the embedded digits, through build_loaders as train.py makes them."""
    from crate_fast.data import LoaderOptions, build_loaders

    opts = LoaderOptions(batch_size=128, img_size=16, num_workers=0, device=torch.device("cpu"), flip=False,
                         scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_pct=1.0)
    data = build_loaders("digits", opts, loader="torchvision")
    got = linear_probe(tiny(arch), data.train, data.val, max_iter=200)
    assert got["n_train"] == 1408 and got["n_val"] == 359, "1438 training images, the last incomplete batch dropped"
    assert 10 < got["val_top1"] <= 100 and np.isfinite(got["train_top1"])


def test_errors():
    model = tiny("mae_crate_tiny")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"pool must be one of \('cls', 'mean'\), got 'avg'"):
        extract_features(model, [(x, y)], pool="avg")
    with pytest.raises(ValueError, match="pool must be one of"):
        linear_probe(model, [(x, y)], [(x, y)], pool="token")
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        linear_probe(model, [], [(x, y)])
    with pytest.raises(ValueError, match="one class"):
        linear_probe(model, [(x, torch.zeros(4))], [(x, y)])
    with pytest.raises(ValueError, match="C must be positive"):
        linear_probe(model, [(x, y)], [(x, y)], C=0)
    with pytest.raises(ValueError, match="max_iter"):
        linear_probe(model, [(x, y)], [(x, y)], max_iter=0)
    with pytest.raises(TypeError, match="CRATE, CRATE-alpha and CRATE-MAE"):
        extract_features(torch.nn.Linear(3, 3), [(x, y)])
    assert model.training


def test_missing_scikit_learn_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)        # import raises ImportError
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        linear_probe(tiny("mae_crate_tiny"), [(x, y)], [(x, y)])


def image_folders(root, per_class=(8, 4)):
    """train/ and val/ ImageFolders of two classes: bright left half vs bright right half, plus noise."""
    from PIL import Image

    gen = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, cls in enumerate(("left", "right")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = gen.integers(0, 60, (16, 16, 3))
                img[:, c * 8:(c + 1) * 8] += 180
                Image.fromarray(img.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_cli_with_a_run_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("mae_crate_tiny", img_size=16, patch_size=4)
    ckpt = tmp_path / "best.pt"            # what train.py writes: weights plus the resolved config
    torch.save({"model": model.state_dict(), "config": {"arch": "mae_crate_tiny", "img_size": 16, "patch_size": 4,
                                                        "pool": "cls", "data": "digits"}}, ckpt)
    data = image_folders(tmp_path / "data")
    out = tmp_path / "probe.json"
    assert main(["--ckpt", str(ckpt), "--data", str(data), "--loader", "torchvision", "--workers", "0",
                 "--batch-size", "4", "--pool", "mean", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert "linear probe (mean, C=1)" in capsys.readouterr().out
    got = json.load(open(out))
    assert (got["n_train"], got["n_val"], got["dim"], got["pool"]) == (16, 8, 384, "mean")
    assert got["val_top1"] == 100.0, "two classes a linear map of the pixels separates"
    assert got["config"]["img_size"] == [16, 16]
    for flags, message in [(["--ckpt", str(tmp_path / "missing.pt"), "--data", str(data)], "does not exist"),
                           (["--ckpt", str(ckpt), "--data", str(tmp_path / "nowhere")], "is not a directory"),
                           (["--ckpt", str(ckpt), "--data", str(data), "--batch-size", "0"], "--batch-size"),
                           (["--ckpt", str(ckpt), "--data", str(data), "--out", str(tmp_path / "no" / "p.json")],
                            "its folder does not exist")]:
        assert main([*flags, "--loader", "torchvision", "--workers", "0"]) == 2, flags
        assert message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--data", str(data), "--pool", "avg"])
