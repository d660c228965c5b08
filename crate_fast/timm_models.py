"""crate_fast models as timm models: ``import crate_fast`` registers every preset with timm (when timm
is installed; it stays optional), so timm's tools take them:

    >>> import crate_fast, timm
    >>> timm.list_models("crate*")
    >>> model = timm.create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    >>> timm.data.resolve_data_config({}, model=model)        # from model.pretrained_cfg

timm's generic options map onto the config: ``global_pool`` "token" / "avg" -> pool "cls" / "mean",
``in_chans``, ``img_size``, ``patch_size``, ``num_classes`` (0: no classifier), ``features_only`` with
``out_indices`` (timm's FeatureGetterNet over forward_intermediates). Options
the model does not have (drop_path_rate, a nonzero drop_rate, ...) are refused. No weights are
downloaded: ``pretrained=True`` raises an error naming the file to fetch by hand (crate_fast.RELEASED).
"""
from __future__ import annotations

from .registry import create_model, family_of, list_models
from .released import RELEASED

GLOBAL_POOLS = {"token": "cls", "avg": "mean", "cls": "cls", "mean": "mean"}    # timm's global_pool -> pool


def pool_for(global_pool: str) -> str:
    """Our pool ("cls" or "mean") for timm's global_pool name. Raises ValueError for any other name."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {global_pool!r}")
    return GLOBAL_POOLS[global_pool]
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def pretrained_cfg(model) -> dict:
    """timm's pretrained_cfg for a crate_fast classifier: input size, ImageNet mean/std, crop_pct and
    interpolation of the official evaluation (resize 256 -> center 224, bicubic), the classifier name."""
    cfg = model.config
    return {"input_size": (cfg.in_chans, *cfg.img_size), "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "crop_pct": 224 / 256, "crop_mode": "center",
            "interpolation": "bicubic", "num_classes": cfg.num_classes, "classifier": "head",
            # the first layer over pixels (CRATE: a Linear on channel-last patches; CRATE-alpha: a conv)
            "first_conv": "patch_embed.proj", "license": "mit"}


def entrypoint(name: str):
    """The timm / torch.hub entry point of a preset: build(pretrained=False, **timm_or_crate_fast_options)."""
    def build(pretrained: bool = False, **kwargs):
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        if pretrained:
            files = [f"{r.file} (crate_fast.load_released)" for r in RELEASED.values() if r.arch == name]
            raise RuntimeError(f"crate-fast downloads no weights; for {name} fetch "
                               f"{' or '.join(files) or 'a checkpoint'} by hand and load it with "
                               "crate_fast.load_weights(model, path) (see the README's weights table)")
        if "global_pool" in kwargs:
            kwargs["pool"] = pool_for(kwargs.pop("global_pool"))
        if kwargs.pop("drop_rate", 0.0):
            raise TypeError(f"{name} has no classifier dropout (drop_rate); its `dropout` is the attention dropout")
        drop_path = kwargs.pop("drop_path_rate", 0.0)
        if drop_path:
            if "drop_path" not in family_of(name).config_class.__dataclass_fields__:
                raise TypeError(f"{name} has no stochastic depth (drop_path_rate)")
            kwargs["drop_path"] = drop_path
        features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", 3)
        model = create_model(name, **kwargs)
        if features_only:      # timm's feature extractor over forward_intermediates (last 3 blocks, as ViTs)
            from timm.models._features import FeatureGetterNet

            model.block_indices(out_indices)           # a bad choice fails here, not at the first forward
            return FeatureGetterNet(model, out_indices=out_indices, prune=False)
        return model

    build.__name__ = name
    build.__doc__ = f"crate_fast.create_model({name!r}) for timm.create_model."
    build.__module__ = __name__
    return build


def timm_models() -> list[str]:
    """The presets timm serves: every image classifier (CRATE, CRATE-alpha); CRATE-MAE is a masked
    autoencoder, outside timm's classifier contract."""
    from .models.base import TokenClassifier

    return [n for n in list_models() if issubclass(family_of(n).model_class, TokenClassifier)]


def register() -> bool:
    """Register every classifier preset with timm (idempotent). Returns False when timm is missing."""
    try:
        from timm.models import is_model, register_model
    except ImportError:
        return False
    for name in timm_models():
        if not is_model(name):
            register_model(entrypoint(name))
    return True
