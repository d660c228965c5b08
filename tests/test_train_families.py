"""train.py with the CRATE-alpha and CRATE-MAE families: the named recipes against the official configs,
timm's mixup/cutmix, MAE pretraining, its exact resume and its linear probe."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import crate_fast  # noqa: E402
import train  # noqa: E402
from crate_fast.training.optim import param_groups  # noqa: E402
from crate_fast.training.recipes import recipe_for  # noqa: E402

# Small synthetic runs: random images, a few steps per epoch, no data preparation.
TINY = ["--data", "synthetic", "--img-size", "16", "--patch-size", "4", "--batch-size", "8", "--synthetic-steps", "3",
        "--workers", "1", "--log-every", "1000"]

# The official big_vision configs of CRATE-alpha (UCSC-VLAA/CRATE-alpha configs/crate/classification/), value by
# value: pre_training_in21k.py and fine_tuning_in1k.py (batch 4096; lr = base_lr * batch // 256).
OFFICIAL_ALPHA = {
    "crate_alpha_in21k": dict(lr=0.00005 * (4096 // 256), batch_size=4096, epochs=91, warmup_epochs=10, min_lr=1e-6,
                              betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0, mixup=0.8, cutmix=1.0,
                              mixup_switch_prob=0.5, label_smoothing=0.0, randaugment=False, scale=(0.08, 1.0),
                              img_size=224),
    "crate_alpha_in1k_ft": dict(lr=0.00001 * (4096 // 256), batch_size=4096, epochs=91, warmup_epochs=10, min_lr=1e-6,
                                betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0, mixup=0.8, cutmix=1.0,
                                mixup_switch_prob=0.5, label_smoothing=0.1, randaugment=True, ra_magnitude=9,
                                scale=(0.08, 1.0), img_size=224),
}


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("recipe", sorted(OFFICIAL_ALPHA))
def test_crate_alpha_recipes_are_the_official_configs(recipe, capsys):
    cfg = train.resolve(train.TrainConfig(arch="crate_alpha_base", recipe=recipe, data="digits"))
    resolved = {k: getattr(cfg, k) for k in OFFICIAL_ALPHA[recipe]}
    print(recipe, json.dumps(resolved))                       # the resolved config, next to the official one
    official = dict(OFFICIAL_ALPHA[recipe])
    assert resolved.pop("lr") == pytest.approx(official.pop("lr"))
    assert resolved == official
    assert cfg.opt == "adamw" and cfg.wd_exclude and cfg.patch_size is None     # the preset's patch (/16)
    # weight decay only on what the official mask '.*/kernel$' hits
    model = crate_fast.create_model("crate_alpha_tiny", depth=1)
    decayed, undecayed = param_groups(model, cfg.weight_decay, cfg.wd_exclude)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == [
        "blocks.0.attn.out.weight", "blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"]
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0


def test_mae_recipe_is_the_papers_with_fairs_loop():
    cfg = train.resolve(train.TrainConfig(arch="mae_crate_base", data="synthetic"))
    assert (cfg.opt, cfg.betas, cfg.weight_decay, cfg.wd_exclude) == ("adamw", (0.9, 0.95), 0.1, True)
    assert cfg.lr == pytest.approx(3e-5 * 4096 / 256) and (cfg.epochs, cfg.warmup_epochs) == (800, 40)
    assert cfg.scale == (0.2, 1.0) and cfg.mask_ratio == 0.75 and cfg.flip
    assert recipe_for("synthetic", None, "masked_autoencoding")[0] == "mae_pretrain"
    # FAIR's grouping: no decay on 1-D tensors and biases; tokens decayed; frozen tables not optimized
    model = crate_fast.create_model("mae_crate_tiny", depth=1, decoder_depth=1, img_size=32, patch_size=8)
    decayed, undecayed = param_groups(model, 0.1, True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"cls_token", "mask_token"} <= {names[id(p)] for p in decayed["params"]}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decayed["params"])
    assert not {"pos_embed", "decoder_pos_embed"} & {names[id(p)] for g in (decayed, undecayed) for p in g["params"]}


def test_flags_a_family_lacks_and_bad_values_are_clear_errors():
    for argv, msg in [
        (["--arch", "crate_tiny", "--mask-ratio", "0.5"], "--mask-ratio does not apply to CRATE models"),
        (["--arch", "mae_crate_tiny", "--pool", "mean"], "--pool does not apply to CRATE-MAE"),
        (["--arch", "mae_crate_tiny", "--mixup", "0.8"], "CRATE-MAE pretraining has none"),
        (["--arch", "crate_tiny", "--probe"], "--probe"),
        (["--arch", "crate_alpha_tiny", "--recipe", "nope"], "unknown recipe"),
        (["--arch", "mae_crate_tiny", "--mask-ratio", "1.0"], r"--mask-ratio must be in \(0, 1\)"),
        (["--arch", "mae_crate_tiny", "--mask-ratio", "0"], r"--mask-ratio must be in \(0, 1\)"),
        (["--arch", "crate_alpha_tiny", "--recipe", "crate_alpha_in1k_ft"], "add --no-randaugment"),
        (["--arch", "crate_alpha_tiny", "--recipe", "crate_alpha_in21k", "--batch-size", "4"], "lower --min-lr"),
        (["--arch", "crate_alpha_tiny", "--drop-path", "1.5"], "drop_path"),
        (["--arch", "crate_alpha_tiny", "--blr", "-1"], "--blr"),
        (["--arch", "crate_tiny", "--recompute"], "--recompute does not apply to CRATE models"),
    ]:
        with pytest.raises(SystemExit, match=msg):
            train.resolve(train.TrainConfig(**vars(train.build_parser().parse_args(argv + ["--data", "synthetic"]))))
    # --lr wins over --blr, --blr over the recipe
    cfg = train.resolve(train.TrainConfig(arch="crate_alpha_tiny", recipe="crate_alpha_in21k", data="synthetic",
                                          blr=1e-4, batch_size=512))
    assert cfg.lr == pytest.approx(2e-4)
    cfg = train.resolve(train.TrainConfig(arch="crate_alpha_tiny", recipe="crate_alpha_in21k", data="synthetic",
                                          lr=3e-3))
    assert cfg.lr == 3e-3


def test_crate_alpha_trains_with_mixup_cutmix_and_drop_path(tmp_path):
    pytest.importorskip("timm")
    out = str(tmp_path / "alpha")
    assert train.main(["--arch", "crate_alpha_tiny", "--recipe", "crate_alpha_in21k", "--epochs", "1",
                       "--warmup-epochs", "0", "--drop-path", "0.1", "--out", out] + TINY) == 0
    (row,) = rows(out)
    assert row["step"] == 3 and row["train_loss"] > 0 and row["val_top1"] >= 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["recipe"] == "crate_alpha_in21k" and cfg["mixup"] == 0.8 and cfg["grad_clip"] == 1.0
    model = crate_fast.create_model("crate_alpha_tiny", img_size=16, patch_size=4)
    crate_fast.load_weights(model, os.path.join(out, "model.safetensors"))
    # one --seed, one run: timm's mixup draws come from numpy's generator, which train.py seeds
    again = str(tmp_path / "again")
    assert train.main(["--arch", "crate_alpha_tiny", "--recipe", "crate_alpha_in21k", "--epochs", "1",
                       "--warmup-epochs", "0", "--drop-path", "0.1", "--out", again] + TINY) == 0
    assert rows(again)[0]["train_loss"] == row["train_loss"]
    # resuming with another model or optimizer layout is a clear error, not a state_dict traceback
    with pytest.raises(SystemExit, match=r"differ from the checkpoint's \(--img-size 16 there, 32 now"):
        train.main(["--arch", "crate_alpha_tiny", "--recipe", "crate_alpha_in21k", "--epochs", "2", "--out", out,
                    "--resume", "auto"] + TINY + ["--img-size", "32"])
    with pytest.raises(SystemExit, match="--opt 'adamw' there, 'lion' now"):
        train.main(["--arch", "crate_alpha_tiny", "--epochs", "2", "--out", out, "--resume", "auto"] + TINY)


def test_mae_pretraining_resumes_exactly_and_probes(tmp_path):
    pytest.importorskip("sklearn")
    args = ["--arch", "mae_crate_tiny", "--epochs", "2", "--warmup-epochs", "1"] + TINY
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert train.main(args + ["--out", full, "--probe"]) == 0
    assert train.main(args + ["--out", split, "--stop-after", "1"]) == 0
    assert train.main(args + ["--out", split, "--resume", "auto"]) == 0
    a, b = rows(full), rows(split)
    assert [r["epoch"] for r in b] == [1, 2] and "val_top1" not in a[0]
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "val_loss", "lr", "step"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    probe = json.load(open(os.path.join(full, "probe.json")))
    assert set(probe) == {"pretrained", "init"} and all(set(by_pool) == {"cls", "mean"} for by_pool in probe.values())
    assert all(r["pool"] == pool and 0 <= r["val_top1"] <= 100
               for by_pool in probe.values() for pool, r in by_pool.items())
    # the best weights are a CRATE-MAE state_dict that loads into a fresh model
    model = crate_fast.create_model("mae_crate_tiny", img_size=16, patch_size=4)
    crate_fast.load_weights(model, os.path.join(full, "model.safetensors"))
    # ... and fine-tunes into a classifier: the encoder's weights, a fresh head
    ft = str(tmp_path / "ft")
    assert train.main(["--arch", "mae_crate_tiny_cls", "--epochs", "1", "--finetune",
                       os.path.join(full, "model.safetensors"), "--out", ft] + TINY) == 0
    tuned = crate_fast.create_model("mae_crate_tiny_cls", img_size=16, patch_size=4, num_classes=1000)
    crate_fast.load_weights(tuned, os.path.join(ft, "last.pt"))
    assert rows(ft)[0]["val_top1"] >= 0 and tuned.head.out_features == 1000


def test_every_flag_has_help_text():
    """--help documents each flag (from its TrainConfig comment) and marks recipe-filled defaults."""
    actions = [a for a in train.build_parser()._actions if a.dest != "help"]
    assert len(actions) == len(train.dataclasses.fields(train.TrainConfig))
    assert all(a.help.strip() for a in actions), [a.dest for a in actions if not a.help.strip()]


def test_mae_pretraining_under_two_process_ddp(tmp_path):
    """DDP (gloo, 2 ranks) pretrains CRATE-MAE and probes across ranks. DDP refuses parameters that get no
    gradient: the official model's dead decoder_embed used to stop this run at its second step."""
    import subprocess

    pytest.importorskip("sklearn")
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--arch", "mae_crate_tiny", "--epochs", "1", "--out", out, "--probe"] + TINY
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (row,) = rows(out)
    assert row["step"] == 3 and row["val_samples"] > 0
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    assert set(json.load(open(os.path.join(out, "probe.json")))) == {"pretrained", "init"}


def test_crate_gpt_trains_on_the_embedded_text_resumes_exactly_and_samples(tmp_path):
    """train.py --arch crate_gpt_tiny --data pydocs: random windows of the standard library's docstrings, the
    language-modeling objective, exact resume (the windows of an epoch replay), a text sample at the end;
    with --recompute (the lean backward), which the saved model's config records."""
    args = ["--arch", "crate_gpt_tiny", "--data", "pydocs", "--epochs", "2", "--epoch-steps", "3", "--val-steps", "2",
            "--batch-size", "4", "--block-size", "32", "--log-every", "1000", "--recompute",
            "--cache-dir", str(tmp_path / "cache")]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert train.main(args + ["--out", full]) == 0
    assert train.main(args + ["--out", split, "--stop-after", "1"]) == 0
    assert train.main(args + ["--out", split, "--resume", "auto"]) == 0
    a, b = rows(full), rows(split)
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "val_loss", "val_ppl", "lr", "step"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    assert a[-1]["val_tokens"] == 2 * 4 * 32 and a[-1]["tok_per_s"] > 0
    sample = open(os.path.join(full, "sample.txt"), encoding="utf-8").read()
    assert sample.startswith("The ") and len(sample) > 100
    model = crate_fast.load_model(os.path.join(full, "model.safetensors"))
    assert model.config.block_size == 32 and model.config.vocab_size == 256 and model.config.recompute
    with pytest.raises(SystemExit, match="holds token ids; CRATE models read images"):
        train.resolve(train.TrainConfig(arch="crate_tiny", data="pydocs"))
    with pytest.raises(SystemExit, match="holds images; CRATE-GPT models read tokens"):
        train.resolve(train.TrainConfig(arch="crate_gpt_tiny", data="digits"))
