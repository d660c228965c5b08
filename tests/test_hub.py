"""Released weights from the Hugging Face Hub (timm's pretrained tags, crate_fast.create_model(pretrained=True),
torch.hub) and Hub-ready models and runs (save_pretrained / from_pretrained / push_to_hub), all without a
network: the HF cache is made by hand in a temporary folder (blobs/, snapshots/<commit>/, refs/main), as
huggingface_hub lays it out, and huggingface_hub is put in offline mode (it reads HF_HUB_OFFLINE once, at
import: the constant is patched, and every call gets cache_dir)."""
import hashlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import crate_fast
from crate_fast import RELEASED, create_model, hub
from crate_fast.models.base import CRATEModel, TokenClassifier

hf_constants = pytest.importorskip("huggingface_hub.constants")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO, REV = "UCSC-VLAA/CRATE-alpha", "24a82372e2d3d11fd173fd826999bc410c8f1341"
B16 = "torch/crate_alpha_B16.pth"
TINY = dict(depth=1, dim=64, heads=2)               # a CRATE-alpha preset's layout at a test's size
FAKE_REPO, FAKE_REV = "crate-fast-test/tiny", "0123456789abcdef0123456789abcdef01234567"


def make_cache(root, repo: str, files: dict[str, bytes], revision: str = FAKE_REV) -> None:
    """A Hugging Face cache entry as huggingface_hub writes one: blobs named by their sha256, a snapshot of
    relative symlinks for the commit, refs/main naming it."""
    entry = root / f"models--{repo.replace('/', '--')}"
    for path, data in files.items():
        blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = entry / "snapshots" / revision / path
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(revision)


def official_file(arch: str, **overrides) -> tuple[dict, bytes]:
    """(crate-fast state_dict, bytes of the same weights in the official layout as torch.save writes them):
    what UCSC-VLAA/CRATE-alpha publishes, at a test's size."""
    torch.manual_seed(1)
    src = create_model(arch, **overrides)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))              # off the initialization: a skipped tensor would show
    buf = io.BytesIO()
    torch.save(crate_fast.to_official_state_dict(src), buf)
    return src.state_dict(), buf.getvalue()


def assert_same(model, sd, skip=()):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        if not k.startswith(skip):
            assert torch.equal(got[k], v), k


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub in offline mode: it reads the cache only and makes no request."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def b16():
    return official_file("crate_alpha_base", **TINY)


@pytest.fixture
def cache(tmp_path, b16):
    make_cache(tmp_path, REPO, {B16: b16[1]}, revision=REV)
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# The released files: tags, the pinned revision, the errors
# ---------------------------------------------------------------------------------------------------
def test_released_hub_files_are_pinned_and_tagged():
    on_hub = [r for r in RELEASED.values() if r.hub_repo]
    assert {r.name for r in on_hub} >= {"crate_alpha_base_in1k", "crate_alpha_large_in1k", "crate_alpha_base_in21k"}
    for r in on_hub:
        assert re.fullmatch(r"[0-9a-f]{40}", r.hub_revision), r.name
        assert r.hub_file and r.url.startswith("https://huggingface.co/")
    for r in RELEASED.values():
        assert r.hub_repo or r.url, f"{r.name}: nowhere to fetch it"
    tags = hub.pretrained_tags()
    assert tags["crate_alpha_base.in21k_ft_in1k"].hub_file == B16
    assert tags["crate_alpha_large.in21k_ft_in1k"].hub_file == "torch/crate_alpha_L14.pth"
    assert all(set(r.overrides) <= {"num_classes"} for r in tags.values())
    assert hub.released_file("crate_alpha_base") is RELEASED["crate_alpha_base_in1k"]     # the first tag
    assert hub.released_file("crate_alpha_large.in21k") is RELEASED["crate_alpha_large_in21k"]


def test_timm_lists_the_tags_with_the_pinned_revision():
    timm = pytest.importorskip("timm")
    tagged = sorted(hub.pretrained_tags())
    assert timm.list_pretrained("crate*") == tagged
    assert {"crate_alpha_base.in21k_ft_in1k", "crate_alpha_large.in21k_ft_in1k", "crate_alpha_base.in21k",
            "crate_alpha_large.in21k"} <= set(tagged)
    cfg = timm.models.get_pretrained_cfg("crate_alpha_base")                 # the default tag
    assert cfg.tag == "in21k_ft_in1k" and cfg.hf_hub_id == f"{REPO}@{REV}" and cfg.hf_hub_filename == B16
    assert cfg.num_classes == 1000 and cfg.input_size == (3, 224, 224) and cfg.license == "apache-2.0"
    assert timm.models.get_pretrained_cfg("crate_alpha_large.in21k").num_classes == 19167
    assert timm.list_models("crate*", pretrained=True, include_tags=False) == ["crate_alpha_base", "crate_alpha_large"]


def test_timm_pretrained_loads_the_cached_official_file_bitwise(cache, b16, offline):
    timm = pytest.importorskip("timm")
    for name in ("crate_alpha_base.in21k_ft_in1k", "crate_alpha_base"):      # the tag, pinned; the default tag
        model = timm.create_model(name, pretrained=True, cache_dir=cache, **TINY)
        assert_same(model, b16[0])
        assert model.pretrained_cfg["hf_hub_id"] == f"{REPO}@{REV}"
        assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 224, 224)


def test_timm_pretrained_with_another_class_count_keeps_a_fresh_head(cache, b16, offline, caplog):
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    model = timm.create_model("crate_alpha_base.in21k_ft_in1k", pretrained=True, num_classes=5, cache_dir=cache,
                              **TINY)
    torch.manual_seed(5)
    fresh = create_model("crate_alpha_base", num_classes=5, **TINY)
    assert model.head.weight.shape == (5, 64)
    assert torch.equal(model.head.weight, fresh.head.weight) and torch.equal(model.head.bias, fresh.head.bias)
    want = {k: v for k, v in b16[0].items() if not k.startswith("head.")}
    assert_same(model, {**want, "head.weight": fresh.head.weight, "head.bias": fresh.head.bias})
    assert "kept this model's fresh classifier" in caplog.text


def test_timm_overlay_to_another_repo_and_feature_extraction(tmp_path, offline):
    """The untagged preset with pretrained_cfg_overlay (unpinned: refs/main), then features_only."""
    timm = pytest.importorskip("timm")
    sd, data = official_file("crate_alpha_tiny", depth=2, num_classes=10, img_size=32, patch_size=8)
    make_cache(tmp_path, FAKE_REPO, {"w.pth": data})
    kw = dict(pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=FAKE_REPO, hf_hub_filename="w.pth"),
              cache_dir=tmp_path, depth=2, num_classes=10, img_size=32, patch_size=8)
    model = timm.create_model("crate_alpha_tiny", **kw)
    assert_same(model, sd)
    assert model.pretrained_cfg["hf_hub_id"] == FAKE_REPO and model.pretrained_cfg["input_size"] == (3, 32, 32)
    feats = timm.create_model("crate_alpha_tiny", features_only=True, out_indices=(0, 1), **kw)
    assert [tuple(f.shape) for f in feats(torch.randn(1, 3, 32, 32))] == [(1, 192, 4, 4)] * 2


def test_a_file_missing_from_the_cache_is_one_clear_error(tmp_path, offline):
    timm = pytest.importorskip("timm")
    command = f"hf download {REPO} torch/crate_alpha_L14.pth --revision {REV} --cache-dir {tmp_path}"
    with pytest.raises(RuntimeError, match=re.escape(command)) as e:
        timm.create_model("crate_alpha_large.in21k_ft_in1k", pretrained=True, cache_dir=tmp_path, **TINY)
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "LocalEntryNotFoundError" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(RuntimeError, match=re.escape(command)):
        create_model("crate_alpha_large", pretrained=True, cache_dir=tmp_path, **TINY)


def test_hf_hub_offline_from_the_environment(cache, b16, tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE as a user sets them (read at import: a fresh interpreter), no
    cache_dir: timm's tag and crate_fast.create_model load from the cache."""
    torch.save(b16[0], tmp_path / "want.pt")
    code = ("import torch, timm, crate_fast\n"
            f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
            "kw = dict(pretrained=True, depth=1, dim=64, heads=2)\n"
            "for m in (timm.create_model('crate_alpha_base.in21k_ft_in1k', **kw),\n"
            "          crate_fast.create_model('crate_alpha_base', **kw)):\n"
            "    assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items())\n"
            "print('ok')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_create_model_pretrained_loads_the_same_file(cache, b16, offline):
    for name in ("crate_alpha_base", "crate_alpha_base_in1k", "crate_alpha_base.in21k_ft_in1k"):
        model = create_model(name, pretrained=True, cache_dir=cache, **TINY)
        assert isinstance(model, crate_fast.CRATEAlpha)
        assert_same(model, b16[0])
    model = create_model("crate_alpha_base", pretrained=True, cache_dir=cache, num_classes=5, **TINY)
    assert model.head.out_features == 5
    assert_same(model, {**b16[0], "head.weight": model.head.weight, "head.bias": model.head.bias}, skip=("head.",))
    # a tagged name without weights builds the model its file needs, as timm does
    assert create_model("crate_alpha_base.in21k", **TINY).head.out_features == 19167


def test_torch_hub_pretrained_loads_the_same_file(cache, b16, offline, monkeypatch):
    model = torch.hub.load(ROOT, "crate_alpha_base", source="local", trust_repo=True, pretrained=True,
                           cache_dir=cache, **TINY)
    assert_same(model, b16[0])
    assert model.pretrained_cfg["hf_hub_id"] == f"{REPO}@{REV}"              # timm's builder set it
    monkeypatch.setitem(sys.modules, "timm.models", None)          # without timm: crate_fast.hub's path
    model = torch.hub.load(ROOT, "crate_alpha_base", source="local", trust_repo=True, pretrained=True,
                           cache_dir=cache, **TINY)
    assert_same(model, b16[0])
    assert "hf_hub_id" not in model.pretrained_cfg


@pytest.mark.parametrize("name, link", [
    ("crate_small", "https://drive.google.com/file/d/1hYgDJl4EKHYfKprwhEjmWmWHuxnK6_h8"),
    ("mae_crate_base", "https://drive.google.com/file/d/11i5BMwymqOsunq44WD3omN5mS6ZREQPO"),
    ("crate_base_demo", "https://colab.research.google.com/drive/1rYn_NlepyW7Fu5LDliyBDmFZylHco7ss"),
])
def test_files_off_the_hub_name_their_link_and_load_released(name, link, monkeypatch):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _no_download)
    with pytest.raises(RuntimeError, match=re.escape(link) + ".*crate_fast.load_released") as e:
        create_model(name, pretrained=True)
    assert "not on the Hugging Face Hub" in str(e.value) and "fetch it by hand" in str(e.value)


def test_a_hub_file_without_a_pinned_commit_is_fetched_by_hand(monkeypatch):
    """CRATE-GPT's Pile checkpoint is on the Hub, but at no commit crate-fast could verify: no download."""
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _no_download)
    with pytest.raises(RuntimeError, match="at no commit crate-fast has pinned.*JackBAI/CRATE-GPT-12L-Pile-600000steps"
                       ".*crate_fast.load_released"):
        create_model("crate_gpt_base", pretrained=True)


def test_presets_without_released_weights_say_so():
    with pytest.raises(RuntimeError, match=r"no released weights exist for crate_base; crate-demo.pth .*fetch it by "
                                           r"hand from https://colab.*load_released"):
        create_model("crate_base", pretrained=True)
    with pytest.raises(RuntimeError, match="no released weights exist for crate_alpha_tiny"):
        create_model("crate_alpha_tiny", pretrained=True)
    with pytest.raises(ValueError, match="crate_alpha_base has no pretrained tag 'in22k'; its tags: "
                                         "crate_alpha_base.in21k_ft_in1k, crate_alpha_base.in21k"):
        create_model("crate_alpha_base.in22k", pretrained=True)
    timm = pytest.importorskip("timm")
    with pytest.raises(RuntimeError, match="no released weights exist for crate_alpha_tiny"):
        timm.create_model("crate_alpha_tiny", pretrained=True)


def test_a_new_family_only_adds_a_row(tmp_path, offline, monkeypatch):
    """The mechanism reads crate_fast.RELEASED: a row with hub_repo / hub_file / hub_revision makes
    create_model(pretrained=True) download it, for any family (here a family timm does not serve)."""
    from crate_fast.released import ReleasedFile
    torch.manual_seed(0)
    src = create_model("mae_crate_tiny", depth=1, img_size=32, patch_size=8)
    buf = io.BytesIO()
    torch.save({"model": src.state_dict(), "epoch": 3}, buf)
    make_cache(tmp_path, FAKE_REPO, {"ckpt/mae.pth": buf.getvalue()})
    row = ReleasedFile("mae_crate_tiny_test", "mae.pth", "mae_crate_tiny", dict(depth=1, img_size=32, patch_size=8),
                       "{'model': state_dict}", "a test", hub_repo=FAKE_REPO, hub_file="ckpt/mae.pth",
                       hub_revision=FAKE_REV)
    monkeypatch.setitem(RELEASED, row.name, row)
    model = create_model("mae_crate_tiny_test", pretrained=True, cache_dir=tmp_path)
    assert type(model) is crate_fast.CRATEMAE and model.config == src.config
    assert_same(model, src.state_dict())
    # a file of another shape than the preset is not the preset's default: the error names the row
    with pytest.raises(RuntimeError, match=re.escape("create_model('mae_crate_tiny_test', pretrained=True) loads it")):
        create_model("mae_crate_tiny", pretrained=True, cache_dir=tmp_path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cached_files_are_read_without_running_code(tmp_path, offline):
    """A file that needs more than tensors and plain containers is refused on either path (weights_only)."""
    buf = io.BytesIO()
    torch.save({"model": {}, "x": _Exploit(tmp_path / "pwned")}, buf)
    make_cache(tmp_path, REPO, {B16: buf.getvalue()}, revision=REV)
    with pytest.raises(crate_fast.io.UnsafeCheckpointError, match="trusted=True"):
        create_model("crate_alpha_base", pretrained=True, cache_dir=tmp_path, **TINY)
    timm = pytest.importorskip("timm")
    with pytest.raises(RuntimeError, match="weights_only=True blocked loading this checkpoint"):    # timm's reader
        timm.create_model("crate_alpha_base", pretrained=True, cache_dir=tmp_path, **TINY)
    assert not (tmp_path / "pwned").exists()


def _no_download(*args, **kwargs):
    raise AssertionError(f"a download was attempted: {args} {kwargs}")


def test_nothing_downloads_without_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _no_download)
    timm = pytest.importorskip("timm")
    monkeypatch.setattr("timm.models._hub.hf_hub_download", _no_download)
    assert timm.create_model("crate_alpha_base.in21k", depth=1).head.out_features == 19167
    assert timm.create_model("crate_alpha_base", depth=1).head.out_features == 1000
    model = create_model("crate_alpha_base", depth=1)
    model.save_pretrained(tmp_path / "m")
    crate_fast.from_pretrained(tmp_path / "m")


# ---------------------------------------------------------------------------------------------------
# Hub-ready models and runs
# ---------------------------------------------------------------------------------------------------
SMALL = dict(depth=2, num_classes=10, img_size=32, patch_size=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("crate_alpha_tiny", **SMALL)


def test_save_pretrained_then_from_pretrained_is_exact(tiny, tmp_path):
    folder = tmp_path / "model"
    assert tiny.save_pretrained(folder) is None
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("family") == "crate_alpha"
    assert crate_fast.CRATEAlphaConfig.from_dict(config) == tiny.config
    assert "library_name: crate-fast" in (folder / "README.md").read_text()
    for load in (crate_fast.from_pretrained, crate_fast.CRATEAlpha.from_pretrained, TokenClassifier.from_pretrained,
                 CRATEModel.from_pretrained):
        model = load(folder)
        assert type(model) is crate_fast.CRATEAlpha and model.config == tiny.config.replace(impl="auto")
        assert_same(model, tiny.state_dict())
    assert crate_fast.from_pretrained(str(folder / "model.safetensors"), impl="torch").config.impl == "torch"
    with pytest.raises(TypeError, match=r"holds a CRATE-.* model \(CRATEAlpha\), not a CRATE: .*"
                                        r"crate_fast.from_pretrained"):
        crate_fast.CRATE.from_pretrained(folder)
    # crate_fast.load_weights and load_model read the same model.safetensors
    dst = create_model("crate_alpha_tiny", **SMALL)
    crate_fast.load_weights(dst, str(folder / "model.safetensors"))
    assert_same(dst, tiny.state_dict())
    assert_same(crate_fast.load_model(str(folder / "model.safetensors")), tiny.state_dict())


def test_from_pretrained_of_a_cached_repository(tiny, tmp_path, offline):
    tiny.save_pretrained(tmp_path / "model")
    files = {f: (tmp_path / "model" / f).read_bytes() for f in ("config.json", "model.safetensors", "README.md")}
    cache = tmp_path / "cache"
    make_cache(cache, FAKE_REPO, files)
    for kw in ({}, {"revision": FAKE_REV}):
        model = crate_fast.CRATEAlpha.from_pretrained(FAKE_REPO, cache_dir=cache, **kw)
        assert model.config == tiny.config
        assert_same(model, tiny.state_dict())
    with pytest.raises(RuntimeError, match=re.escape("hf download crate-fast-test/nothing model.safetensors")) as e:
        crate_fast.from_pretrained("crate-fast-test/nothing", cache_dir=cache)
    assert "taken as a Hub repository id" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no folder or file, nor a Hugging Face Hub repository id"):
        crate_fast.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def _run_config(arch: str, **flags) -> dict:
    """config.json as train.py writes it: the resolved flags (a few of them), not the model config."""
    return {"arch": arch, "data": "digits", "out": "runs/x", "epochs": 1, "batch_size": 32, "lr": 1e-3, "impl": "auto",
            "world_size": 1, "recipe": "digits", **flags}


def test_a_train_py_run_folder_loads_as_it_is(tmp_path):
    torch.manual_seed(0)
    src = create_model("crate_tiny", num_classes=10, img_size=32, patch_size=8, pool="mean")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(_run_config("crate_tiny", img_size=32, patch_size=8, pool="mean")))
    crate_fast.save_weights(src, run / "model.safetensors")             # what train.py writes with the best model
    for load in (crate_fast.from_pretrained, crate_fast.CRATE.from_pretrained):
        model = load(run)
        assert type(model) is crate_fast.CRATE and model.config == src.config
        assert_same(model, src.state_dict())
    with pytest.raises(TypeError, match=r"holds a CRATE model \(CRATE\), not a CRATEAlpha"):
        crate_fast.CRATEAlpha.from_pretrained(run)
    # weights without crate-fast's record: the model comes from config.json (the run's flags, or a model config)
    from safetensors.torch import save_file
    save_file(src.state_dict(), run / "model.safetensors")
    model = crate_fast.from_pretrained(run)
    assert model.config == src.config and model.config.pool == "mean"
    assert_same(model, src.state_dict())
    (run / "config.json").write_text(json.dumps({"family": "crate", **src.config.to_dict()}))
    assert_same(crate_fast.from_pretrained(run), src.state_dict())
    os.remove(run / "config.json")
    with pytest.raises(ValueError, match="does not say which model it holds"):
        crate_fast.from_pretrained(run)
    os.remove(run / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        crate_fast.from_pretrained(run)


def test_push_to_hub_offline_fails_at_once(tiny, tmp_path, offline):
    from huggingface_hub.errors import OfflineModeIsEnabled
    with pytest.raises(OfflineModeIsEnabled):
        tiny.push_to_hub("crate-fast-test/push")
    with pytest.raises(OfflineModeIsEnabled):
        tiny.save_pretrained(tmp_path / "m", push_to_hub=True)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_without_huggingface_hub_local_folders_still_work(tmp_path):
    code = ("import sys; sys.modules['huggingface_hub'] = None\n"
            "import crate_fast, torch\n"
            "m = crate_fast.create_model('crate_tiny', num_classes=3, img_size=16, patch_size=8, depth=1)\n"
            f"m.save_pretrained({str(tmp_path / 'm')!r})\n"
            f"n = crate_fast.from_pretrained({str(tmp_path / 'm')!r})\n"
            "assert all(torch.equal(v, n.state_dict()[k]) for k, v in m.state_dict().items())\n"
            "try:\n"
            "    crate_fast.create_model('crate_alpha_base', pretrained=True)\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ImportError: loading from the Hugging Face Hub needs huggingface_hub: pip install" in p.stdout
