"""The known released weight files of the CRATE family: what each one is, the model it needs, and where it
was published. Data only: it imports nothing of crate_fast. crate_fast.checkpoint identifies a file by
its layout and loads it (``load_released``); crate_fast.registry builds the model a file needs by its name.

    model = crate_fast.load_released("crate-demo.pth")            # identifies the file, builds, loads
    model = crate_fast.create_model("crate_base_demo")            # the model a known file needs

Files are read safely (crate_fast.read_checkpoint): FAIR-style checkpoints keep their training arguments
as an ``argparse.Namespace``, which the reader allows explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReleasedFile:
    """One published weight file. ``name`` is also a :func:`crate_fast.create_model` name that builds the
    model the file needs (``arch`` with ``overrides``); ``ignore`` lists file keys the model has no use
    for (skipped, and reported, when loading)."""

    name: str
    file: str
    arch: str
    overrides: dict
    container: str                     # how the state_dict sits in the file
    where: str                         # where it was published (download by hand)
    note: str = ""
    ignore: dict = field(default_factory=dict)    # file key -> shape, present in the file, unused


RELEASED: dict[str, ReleasedFile] = {r.name: r for r in [
    ReleasedFile(
        "crate_small_in1k", "CRATE_small.pth (released CRATE-S)", "crate_small", {},
        "main.py checkpoint: {'state_dict': {'module.' + key: ...}, 'epoch', 'arch', 'optimizer', ...}",
        "Google Drive link in the official README (Ma-Lab-Berkeley/CRATE); the link is dead since 2025 "
        "(official issue #30)",
        "ImageNet-1K, 224 px, patch 16; the maintainers say it differs from the paper's model (issue #28)."),
    ReleasedFile(
        "crate_base_demo", "crate-demo.pth (the official Colab demo)", "crate_base",
        dict(patch_size=8, heads=6, num_classes=768),
        "{'model': state_dict}, no prefix",
        "the checkpoint the official Colab demo notebook downloads (linked from the official README)",
        "CRATE-B at patch 8 with 6 heads of 128 (ImageNet-21K); its classifier is LayerNorm + Linear(768, 768) "
        "and the file carries an extra 21,842-class `head` the notebook never uses.",
        ignore={"head.weight": (21842, 768), "head.bias": (21842,)}),
    ReleasedFile(
        "crate_mae_base_in1k", "crate-mae-base-lmd0.5-checkpoint-799.pth (CRATE-MAE-Base)", "mae_crate_base", {},
        "FAIR MAE save_model: {'model': state_dict (206 keys, no prefix), 'optimizer', 'epoch': 799, 'scaler', "
        "'args': Namespace}",
        "Google Drive link in the official README (Ma-Lab-Berkeley/CRATE, \"Training/Fine-Tuning CRATE-MAE\")",
        "800 epochs of ImageNet-1K pretraining with lambda = 0.5 (the file's name and the official code agree); "
        "whether norm_pix_loss was on is recorded only in the file's args (it changes the loss, not the weights)."),
    ReleasedFile(
        "crate_alpha_base_in1k", "crate_alpha_B16.pth (CRATE-alpha-B/16)", "crate_alpha_base", {},
        "a raw state_dict of the official PyTorch port (conv1.*, transformer.layers.*, mlp_head.*)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/ (linked from the official README)",
        "IN-21K pretrained, IN-1K finetuned, 224 px; 81.2% IN-1K top-1 (official README)."),
    ReleasedFile(
        "crate_alpha_large_in1k", "crate_alpha_L14.pth (CRATE-alpha-L/14)", "crate_alpha_large", {},
        "a raw state_dict of the official PyTorch port (conv1.*, transformer.layers.*, mlp_head.*)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/ (linked from the official README)",
        "IN-21K pretrained, IN-1K finetuned, 224 px; 83.9% IN-1K top-1 (official README)."),
]}
