"""crate_fast models as timm models: ``import crate_fast`` registers every preset with timm (when timm
is installed; it stays optional), so timm's tools take them:

    >>> import crate_fast, timm
    >>> timm.list_models("crate*")
    >>> model = timm.create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    >>> timm.data.resolve_data_config({}, model=model)        # from model.pretrained_cfg

timm's generic options map onto the config: ``global_pool`` "token" / "avg" / "" -> pool "cls" / "mean" / "none",
``in_chans``, ``img_size``, ``patch_size``, ``num_classes`` (0: no classifier; with ``global_pool=""``
the unpooled tokens), ``features_only`` with
``out_indices`` (timm's FeatureGetterNet over forward_intermediates). Options
the model does not have (drop_path_rate, a nonzero drop_rate, ...) are refused. No weights are
downloaded: ``pretrained=True`` raises an error naming the file to fetch by hand (crate_fast.RELEASED).
"""
from __future__ import annotations

from .models.base import pool_for
from .registry import FAMILIES, create_model, family_of, list_models
from .released import RELEASED

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


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
    """The presets timm serves: those of every family that declares it (the image classifiers; CRATE-MAE
    is a masked autoencoder, outside timm's classifier contract)."""
    return sorted(n for f in FAMILIES.values() if f.timm for n in list_models(f.name))


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
