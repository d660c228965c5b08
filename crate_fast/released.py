"""The known released weight files of the CRATE family: what each one is, the model it needs, and where it
was published. Data only: it imports nothing of crate_fast. crate_fast.checkpoint identifies a file by
its layout and loads it (``load_released``); crate_fast.registry builds the model a file needs by its name;
crate_fast.hub downloads the files published on the Hugging Face Hub (``hub_repo``: ``pretrained=True``, timm's
pretrained tags) and names the link (``url``) of those it cannot download.

    model = crate_fast.load_released("crate-demo.pth")            # identifies the file, builds, loads
    model = crate_fast.create_model("crate_base_demo")            # the model a known file needs
    model = crate_fast.create_model("crate_alpha_base", pretrained=True)   # a Hub file, into the HF cache

Files are read safely (crate_fast.read_checkpoint): FAIR-style checkpoints keep their training arguments
as an ``argparse.Namespace``, which the reader allows explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReleasedFile:
    """One published weight file. ``name`` is also a :func:`crate_fast.create_model` name that builds the
    model the file needs (``arch`` with ``overrides``); ``ignore`` lists file keys the model has no use
    for (skipped, and reported, when loading).

    Where it is: ``url``, the page or link to fetch it by hand; on the Hugging Face Hub, ``hub_repo``
    ("org/name"), ``hub_file`` (its path there) and ``hub_revision`` (the commit it is pinned to, 40 hex
    digits; "" leaves it unpinned). ``tag``: timm's pretrained tag, ``timm.create_model(f"{arch}.{tag}",
    pretrained=True)``; a tagged file loads into ``arch`` itself, so its overrides change only
    ``num_classes`` (the first tag of an arch, in this table's order, is what ``pretrained=True`` on the
    bare arch name loads). ``license``: as the publisher states it."""

    name: str
    file: str
    arch: str
    overrides: dict
    container: str                     # how the state_dict sits in the file
    where: str                         # where it was published (download by hand)
    note: str = ""
    ignore: dict = field(default_factory=dict)    # file key -> shape, present in the file, unused
    url: str = ""
    hub_repo: str = ""
    hub_file: str = ""
    hub_revision: str = ""
    tag: str = ""
    license: str = ""


# UCSC-VLAA/CRATE-alpha on the Hugging Face Hub, pinned to commit 24a8237 ("Upload 3 files", 2024-08-03):
# the sixth of the repository's seven commits, after the one that added torch/crate_alpha_B16.pth and
# _L14.pth (b327dc61c86d59ecfa20d1f5674c449ec0bf373c, "Upload 4 files") and the two that added the IN-21K
# files; the seventh (2e886d6) only deletes vanilla_crate_B32_in21k.pth. Read from the repository's commit
# and tree pages (huggingface.co/UCSC-VLAA/CRATE-alpha/commit/24a8237..., /commits/main/torch), not
# checked against the live Hub: crate-fast's tests run without a network.
CRATE_ALPHA_HUB = "UCSC-VLAA/CRATE-alpha"
CRATE_ALPHA_REVISION = "24a82372e2d3d11fd173fd826999bc410c8f1341"
_ALPHA = dict(hub_repo=CRATE_ALPHA_HUB, hub_revision=CRATE_ALPHA_REVISION, license="apache-2.0")
IN21K_CLASSES = 19167      # the official IN-21K pretraining config's num_classes (pre_training_in21k.py)


def _alpha_in21k(name: str, hub_file: str, arch: str, size: str, **overrides) -> ReleasedFile:
    """One of CRATE-alpha's IN-21K pretrained files (torch/in21k_Pretrain/; no timm tag unless given one)."""
    tag = overrides.pop("tag", "")
    return ReleasedFile(
        name, f"{hub_file.rsplit('/', 1)[1]} (CRATE-alpha-{size}, ImageNet-21K)", arch,
        dict(overrides, num_classes=IN21K_CLASSES),
        "assumed: a raw state_dict of the official PyTorch port, as crate_alpha_B16.pth (not verified: the "
        "published sizes fit that layout with a 19,167-class head, B/32's and L/32's bytes to 0.005%)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/in21k_Pretrain/ (official issue #2)",
        "ImageNet-21K pretrained (19,167 classes), 224 px, before the IN-1K fine-tuning.",
        url=f"https://huggingface.co/{CRATE_ALPHA_HUB}/blob/{CRATE_ALPHA_REVISION}/{hub_file}",
        hub_file=hub_file, tag=tag, **_ALPHA)


RELEASED: dict[str, ReleasedFile] = {r.name: r for r in [
    ReleasedFile(
        "crate_small_in1k", "CRATE_small.pth (released CRATE-S)", "crate_small", {},
        "main.py checkpoint: {'state_dict': {'module.' + key: ...}, 'epoch', 'arch', 'optimizer', ...}",
        "Google Drive link in the official README (Ma-Lab-Berkeley/CRATE); the link is dead since 2025 "
        "(official issue #30)",
        "ImageNet-1K, 224 px, patch 16; the maintainers say it differs from the paper's model (issue #28).",
        url="https://drive.google.com/file/d/1hYgDJl4EKHYfKprwhEjmWmWHuxnK6_h8/view?usp=share_link"),
    ReleasedFile(
        "crate_base_demo", "crate-demo.pth (the official Colab demo)", "crate_base",
        dict(patch_size=8, heads=6, num_classes=768),
        "{'model': state_dict}, no prefix",
        "the checkpoint the official Colab demo notebook downloads (linked from the official README)",
        "CRATE-B at patch 8 with 6 heads of 128 (ImageNet-21K); its classifier is LayerNorm + Linear(768, 768) "
        "and the file carries an extra 21,842-class `head` the notebook never uses.",
        ignore={"head.weight": (21842, 768), "head.bias": (21842,)},
        url="https://colab.research.google.com/drive/1rYn_NlepyW7Fu5LDliyBDmFZylHco7ss?usp=sharing"),
    ReleasedFile(
        "crate_mae_base_in1k", "crate-mae-base-lmd0.5-checkpoint-799.pth (CRATE-MAE-Base)", "mae_crate_base", {},
        "FAIR MAE save_model: {'model': state_dict (206 keys, no prefix), 'optimizer', 'epoch': 799, 'scaler', "
        "'args': Namespace}",
        "Google Drive link in the official README (Ma-Lab-Berkeley/CRATE, \"Training/Fine-Tuning CRATE-MAE\")",
        "800 epochs of ImageNet-1K pretraining with lambda = 0.5 (the file's name and the official code agree); "
        "whether norm_pix_loss was on is recorded only in the file's args (it changes the loss, not the weights).",
        url="https://drive.google.com/file/d/11i5BMwymqOsunq44WD3omN5mS6ZREQPO/view?usp=sharing"),
    ReleasedFile(
        "crate_alpha_base_in1k", "crate_alpha_B16.pth (CRATE-alpha-B/16)", "crate_alpha_base", {},
        "a raw state_dict of the official PyTorch port (conv1.*, transformer.layers.*, mlp_head.*)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/ (linked from the official README)",
        "IN-21K pretrained, IN-1K finetuned, 224 px; 81.2% IN-1K top-1 (official README).",
        url=f"https://huggingface.co/{CRATE_ALPHA_HUB}/blob/{CRATE_ALPHA_REVISION}/torch/crate_alpha_B16.pth",
        hub_file="torch/crate_alpha_B16.pth", tag="in21k_ft_in1k", **_ALPHA),
    ReleasedFile(
        "crate_alpha_large_in1k", "crate_alpha_L14.pth (CRATE-alpha-L/14)", "crate_alpha_large", {},
        "a raw state_dict of the official PyTorch port (conv1.*, transformer.layers.*, mlp_head.*)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/ (linked from the official README)",
        "IN-21K pretrained, IN-1K finetuned, 224 px; 83.9% IN-1K top-1 (official README).",
        url=f"https://huggingface.co/{CRATE_ALPHA_HUB}/blob/{CRATE_ALPHA_REVISION}/torch/crate_alpha_L14.pth",
        hub_file="torch/crate_alpha_L14.pth", tag="in21k_ft_in1k", **_ALPHA),
    _alpha_in21k("crate_alpha_base_in21k", "torch/in21k_Pretrain/crate_alpha_B16_IN21K", "crate_alpha_base", "B/16",
                 tag="in21k"),
    _alpha_in21k("crate_alpha_large_in21k", "torch/in21k_Pretrain/crate_alpha_L14_IN21K", "crate_alpha_large",
                 "L/14", tag="in21k"),
    _alpha_in21k("crate_alpha_base_patch8_in21k", "torch/in21k_Pretrain/crate_alpha_B8_IN21K", "crate_alpha_base",
                 "B/8", patch_size=8),
    _alpha_in21k("crate_alpha_base_patch32_in21k", "torch/in21k_Pretrain/crate_alpha_B32_in21k.pth",
                 "crate_alpha_base", "B/32", patch_size=32),
    _alpha_in21k("crate_alpha_large_patch8_in21k", "torch/in21k_Pretrain/crate_alpha_L8_IN21K", "crate_alpha_large",
                 "L/8", patch_size=8),
    _alpha_in21k("crate_alpha_large_patch32_in21k", "torch/in21k_Pretrain/crate_alpha_L32_in21k.pth",
                 "crate_alpha_large", "L/32", patch_size=32),
    # CRATE-GPT (crate-lm's overcomplete 12-layer model on the Pile). Its Hub repository's commit could not be
    # verified (no stored copy of its history): pretrained=True downloads pinned revisions only, so until one
    # is, the file is fetched by hand (`hf download JackBAI/CRATE-GPT-12L-Pile-600000steps
    # ckpt-crate-12l-overparam-600000.pt`) and loaded with crate_fast.load_released.
    ReleasedFile(
        "crate_gpt_base_pile", "ckpt-crate-12l-overparam-600000.pt (CRATE-GPT-12L, the Pile, 600k steps)",
        "crate_gpt_base", {},
        "nanoGPT's train.py checkpoint: {'model': state_dict (101 keys; '_orig_mod.' under torch.compile), "
        "'optimizer' (Adam moments), 'model_args' (n_layer, n_head, n_embd, ...), 'iter_num', 'best_val_loss', "
        "'config'}",
        "huggingface.co/JackBAI/CRATE-GPT-12L-Pile-600000steps (linked from crate-lm's README)",
        "983 MB = fp32 weights + Adam's two moments of the overcomplete 12 / 12 / 768 model (81.9M parameters); "
        "the loader checks its model_args' n_head.",
        url="https://huggingface.co/JackBAI/CRATE-GPT-12L-Pile-600000steps"),
]}
