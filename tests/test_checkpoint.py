"""Official checkpoint import/export: same logits as the official model, strict, clear errors."""
import pytest
import torch
from harness import assert_rel
from official_crate import official_small

import crate_fast
from crate_fast import create_model, load_official_state_dict, load_weights, to_official_state_dict
from crate_fast.models.keys import crate_fast_key, official_key


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    m = official_small(num_classes=10, image_size=32, patch_size=4, depth=12)
    # Move every parameter off its init so the test would notice a skipped or misplaced tensor.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def test_key_maps_are_inverse():
    m = create_model("crate_small", num_classes=10, img_size=32, patch_size=4, depth=2)
    for k in m.state_dict():
        assert crate_fast_key(m, official_key(m, k)) == k


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_official_crate_small_same_logits(official, impl):
    """The issue's acceptance test: crate_small at 32 px / patch 4 (head dim 48), fp32, every impl."""
    from conftest import KERNEL_DEVICE
    x = torch.randn(3 if impl != "triton" else 1, 3, 32, 32)
    with torch.no_grad():
        ref = official.double()(x.double())
        official.float()
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4, impl=impl)
    load_official_state_dict(model, {"state_dict": {"module." + k: v for k, v in official.state_dict().items()}})
    dev = KERNEL_DEVICE if impl == "triton" else "cpu"
    with torch.no_grad():
        out = model.to(dev).eval()(x.to(dev)).cpu()
    assert_rel(out, ref[: x.shape[0]], what=impl)


def test_round_trip(official):
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    load_official_state_dict(model, official.state_dict())
    back = to_official_state_dict(model)
    assert list(back) == list(official.state_dict())
    fresh = official_small(num_classes=10, image_size=32, patch_size=4)
    fresh.load_state_dict(back, strict=True)
    for k, v in official.state_dict().items():
        assert torch.equal(back[k], v), k


def test_wrappers_and_prefixes(official, tmp_path):
    sd = official.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "arch": "CRATE_small", "best_acc1": torch.tensor(1.0),
                "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    for obj in (sd, {"model": sd}, str(path), path):
        model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
        load_official_state_dict(model, obj)
        assert torch.equal(model.blocks[3].ista.weight, sd["transformer.layers.3.1.fn.weight"])


def test_missing_unexpected_and_mismatched_keys_are_listed(official):
    sd = dict(official.state_dict())
    del sd["transformer.layers.0.1.fn.weight"]
    sd["head.weight"] = torch.zeros(3)
    sd["mlp_head.1.bias"] = torch.zeros(7)
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        load_official_state_dict(model, sd)
    msg = str(e.value)
    assert "missing keys (1): transformer.layers.0.1.fn.weight" in msg
    assert "unexpected keys (1): head.weight" in msg
    assert "mlp_head.1.bias: checkpoint (7,) vs model (10,)" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "partial load"


def test_prefix_mismatch_is_an_error_not_a_silent_partial_load(official):
    sd = {"encoder." + k: v for k, v in official.state_dict().items()}
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    with pytest.raises(RuntimeError, match="missing keys"):
        load_official_state_dict(model, sd)


def test_depth_mismatch(official):
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4, depth=11)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_official_state_dict(model, official.state_dict())


def test_reset_head_and_new_image_size(official):
    model = create_model("crate_small", num_classes=4, img_size=48, patch_size=4)
    head = model.head.weight.clone()
    load_official_state_dict(model, official.state_dict(), reset_head=True)
    assert torch.equal(model.head.weight, head)
    assert model.pos_embed.shape == (1, 145, 576)
    # The class row is copied; the 8x8 grid is bicubically resized to 12x12.
    assert torch.equal(model.pos_embed[:, 0], official.pos_embedding[:, 0])
    with pytest.raises(RuntimeError, match="reset_head=True"):
        load_official_state_dict(create_model("crate_small", num_classes=4, img_size=32, patch_size=4),
                                 official.state_dict())


def test_bad_objects():
    model = create_model("crate_tiny", num_classes=2, img_size=16, patch_size=4, depth=1)
    with pytest.raises(TypeError, match="state_dict"):
        load_official_state_dict(model, [1, 2])
    with pytest.raises(TypeError, match="not a tensor"):
        load_official_state_dict(model, {"epoch": 3})
    with pytest.raises(ValueError, match="already a crate_fast state_dict"):
        load_official_state_dict(model, model.state_dict())


# ---------------------------------------------------------------------------------------------------
# Safe loading: nothing in a file runs; our own files, containers and safetensors load through one loader
# ---------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_callable_is_refused_and_never_runs(official, tmp_path):
    from crate_fast import load_weights, read_checkpoint
    from crate_fast.io import UnsafeCheckpointError
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"state_dict": official.state_dict(), "args": _Exploit(marker)}, path)
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    for load in (read_checkpoint, lambda p: load_official_state_dict(model, p), lambda p: load_weights(model, p)):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*trusted=True.*--trust-checkpoint"):
            load(str(path))
    assert not marker.exists(), "code from the checkpoint ran"
    load_official_state_dict(model, str(path), trusted=True)         # the explicit opt-in for a trusted file
    assert marker.exists()


def test_safetensors_and_our_own_containers_load(official, tmp_path):
    from safetensors.torch import save_file

    from crate_fast import load_weights
    src = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    load_official_state_dict(src, official.state_dict())
    save_file(to_official_state_dict(src), str(tmp_path / "official.safetensors"))
    save_file(src.state_dict(), str(tmp_path / "ours.safetensors"))
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, tmp_path / "ddp.pt")
    for path in ("official.safetensors", "ours.safetensors", "ddp.pt"):
        model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
        load_weights(model, str(tmp_path / path))
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (path, k)


def test_bad_files_get_clear_errors(tmp_path):
    from crate_fast import read_checkpoint
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_ignore_skips_named_keys_and_is_strict_about_them(official, caplog):
    sd = dict(official.state_dict())
    sd["head.weight"], sd["head.bias"] = torch.zeros(3, 576), torch.zeros(3)    # a head the model lacks
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    with pytest.raises(RuntimeError, match="(?s)unexpected keys .2.: head.weight, head.bias.*ignore="):
        load_official_state_dict(model, sd)
    load_official_state_dict(model, sd, ignore=["head.weight", "head.bias"])
    assert "skipped 2 key(s) named in ignore: head.bias, head.weight" in caplog.text
    with pytest.raises(ValueError, match="ignore names keys the file does not have: head.typo"):
        load_official_state_dict(model, sd, ignore=["head.typo"])


# ---------------------------------------------------------------------------------------------------
# Known released files
# ---------------------------------------------------------------------------------------------------
def test_the_colab_demo_layout_loads_and_gives_the_official_logits(tmp_path):
    """crate-demo.pth: the official module tree at CRATE-B width, patch 8, 6 heads of 128, a 768-wide
    mlp_head and an extra 21,842-class `head` its forward never uses, stored as {'model': sd}."""
    from official_crate import OfficialCRATE

    from crate_fast import RELEASED, load_released
    torch.manual_seed(0)
    off = OfficialCRATE(image_size=224, patch_size=8, num_classes=768, dim=768, depth=12, heads=6, dim_head=128)
    off.head = torch.nn.Linear(768, 21842)                       # as the notebook attaches it
    path = tmp_path / "crate-demo.pth"
    torch.save({"model": off.state_dict()}, path)
    model = load_released(str(path), impl="torch")
    assert model.config.patch_size == (8, 8) and model.config.heads == 6 and model.config.dim_head == 128
    assert set(RELEASED["crate_base_demo"].ignore) == {"head.weight", "head.bias"}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        truth = off.double()(x.double())
        out = model.eval()(x)
    assert_rel(out, truth, what="colab demo logits")
    # The same file into a CRATE-B/8 with 12 heads would load silently (every shape agrees): the table
    # is what tells them apart, and create_model builds the right one by the file's name.
    assert create_model("crate_base_demo").config.heads == 6


def test_an_unknown_layout_names_the_closest_known_file():
    from crate_fast.checkpoint import identify
    with torch.device("meta"):
        sd = to_official_state_dict(create_model("crate_small", num_classes=100))
    with pytest.raises(ValueError, match=r"closest: crate_small_in1k .*shapes 2: mlp_head.1.weight: \(100, 576\) vs "
                                         r"\(1000, 576\)"):
        identify(sd)
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4, depth=2)
    with pytest.raises(RuntimeError, match="closest known released file: crate_small_in1k"):
        load_official_state_dict(model, {k: torch.empty(v.shape) for k, v in sd.items()})


def test_fair_style_checkpoints_with_argparse_args_load_without_trust(official, tmp_path):
    """FAIR's MAE/DeiT save_model stores {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}."""
    import argparse
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": official.state_dict(), "epoch": 799, "args": argparse.Namespace(norm_pix_loss=True)}, path)
    model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    load_official_state_dict(model, str(path))
    assert torch.equal(model.blocks[0].ista.weight, official.state_dict()["transformer.layers.0.1.fn.weight"])


def test_the_analysis_cli_refuses_a_checkpoint_that_runs_code(tmp_path, capsys):
    from crate_fast.analyze import main
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"arch": "crate_tiny"}, "x": _Exploit(marker)}, path)
    assert main(["--ckpt", str(path), "--out", str(tmp_path / "out"), "--images", "digits"]) == 2
    err = capsys.readouterr().err
    assert "evil.pt" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_loader_input_mistakes_get_clear_errors(tmp_path):
    """Found by trying the loaders as a new user would."""
    import pickle

    from crate_fast import load_weights, read_checkpoint, save_weights
    model = create_model("crate_tiny", num_classes=3, img_size=16, patch_size=8, depth=1)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="name the file \\*.safetensors"):
        save_weights(model, tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="folder of"):
        save_weights(model, tmp_path / "missing" / "x.safetensors")
    with pytest.raises(TypeError, match="list of key names"):
        load_weights(model, model.state_dict(), ignore="head.weight")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_weights(model, {})
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-1] + b"junk")
    with pytest.raises(ValueError, match=r"not a readable PyTorch checkpoint \((?!\[)"):  # a message, not a list
        read_checkpoint(tmp_path / "raw.pkl")
    headless = create_model("crate_tiny", num_classes=0, img_size=16, patch_size=8, depth=1)
    load_weights(headless, model.state_dict(), reset_head=True)        # a classifier checkpoint into a backbone
    with pytest.raises(RuntimeError, match="unexpected keys .2.: head.weight, head.bias"):
        load_weights(headless, model.state_dict())


# ---------------------------------------------------------------------------------------------------
# Position tables are resized from the grid the file was trained on (bug hunt C21)
# ---------------------------------------------------------------------------------------------------
def _oracle_resize(table, old, new):
    """bicubic F.interpolate of the patch rows from grid `old` to grid `new`, CLS row kept."""
    grid = table[:, 1:].reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


def _tiny(img_size):
    return create_model("crate_tiny", num_classes=10, img_size=img_size, patch_size=4, depth=1)


def test_a_table_of_the_same_count_but_another_grid_is_resized_from_the_file_grid(tmp_path, caplog):
    torch.manual_seed(0)
    src = _tiny(32)                                                   # 8x8 = 64 positions
    with torch.no_grad():
        src.pos_embed.normal_()
    dst = load_weights(_tiny((16, 64)), src.state_dict())             # 4x16 = 64 positions too
    torch.testing.assert_close(dst.pos_embed, _oracle_resize(src.pos_embed, (8, 8), (4, 16)))
    assert "from a 8x8 to a 4x16 patch grid" in caplog.text and "taken as square" in caplog.text
    # crate-fast's own files record their grid: a 4x16 run into a 4x4 model is resized from 4x16, not 8x8
    run = _tiny((16, 64))
    with torch.no_grad():
        run.pos_embed.normal_()
    crate_fast.save_weights(run, tmp_path / "model.safetensors")
    torch.save({"model": run.state_dict(), "config": {"arch": "crate_tiny", "img_size": [16, 64], "patch_size": 4}},
               tmp_path / "last.pt")
    for path in ("model.safetensors", "last.pt"):
        caplog.clear()
        got = load_weights(_tiny(16), str(tmp_path / path))
        torch.testing.assert_close(got.pos_embed, _oracle_resize(run.pos_embed, (4, 16), (4, 4)))
        assert "from a 4x16 to a 4x4 patch grid (the file's grid recorded in the file)" in caplog.text, path
    # the same grid recorded: loaded as is, no report
    caplog.clear()
    assert torch.equal(load_weights(_tiny((16, 64)), str(tmp_path / "model.safetensors")).pos_embed, run.pos_embed)
    assert "resized" not in caplog.text


def test_a_table_of_unknown_non_square_grid_is_an_error_naming_pos_grid():
    run = _tiny((16, 48))                                             # 4x12 = 48 positions, not a square
    with pytest.raises(ValueError, match=r"48 patch positions, not a square grid.*pos_grid"):
        load_weights(_tiny(16), run.state_dict())
    got = load_weights(_tiny(16), run.state_dict(), pos_grid=(4, 12))
    torch.testing.assert_close(got.pos_embed, _oracle_resize(run.pos_embed, (4, 12), (4, 4)))
    with pytest.raises(ValueError, match="a 5x5 grid .* does not hold"):
        load_weights(_tiny(16), run.state_dict(), pos_grid=(5, 5))
