"""crate_fast models as timm models: ``import crate_fast`` registers every preset with timm (when timm
is installed; it stays optional), so timm's tools take them:

    >>> import crate_fast, timm
    >>> timm.list_models("crate*")
    >>> model = timm.create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    >>> timm.data.resolve_data_config({}, model=model)        # from model.pretrained_cfg
    >>> timm.list_pretrained("crate*")                         # crate_alpha_base.in21k_ft_in1k, ...
    >>> model = timm.create_model("crate_alpha_base.in21k_ft_in1k", pretrained=True, num_classes=10)

timm's generic options map onto the config: ``global_pool`` "token" / "avg" / "" -> pool "cls" / "mean" / "none",
``in_chans``, ``img_size``, ``patch_size``, ``num_classes`` (0: no classifier; with ``global_pool=""``
the unpooled tokens), ``features_only`` with
``out_indices`` (timm's FeatureGetterNet over forward_intermediates). Options
the model does not have (drop_path_rate, a nonzero drop_rate, ...) are refused.

Pretrained tags come from crate_fast.RELEASED (the files on the Hugging Face Hub with a ``tag``: hf_hub_id
pinned to a commit, hf_hub_filename). ``pretrained=True`` goes through timm's build_model_with_cfg, which
downloads the file into the HF cache (timm reads it with weights_only) and hands it to crate-fast's own
strict loader as the filter (crate_fast.load_weights: the official key map, position / stem resampling, a
fresh head for another class count). A preset without a Hub file raises an error naming where to fetch
its weights by hand; a file neither the Hub nor the cache can give, the ``hf download`` command.
"""
from __future__ import annotations

import torch

from . import hub
from .checkpoint import load_weights
from .models.base import pool_for
from .registry import FAMILIES, create_model, family_of, list_models
from .released import RELEASED

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# timm's pretrained cfgs of this module's entry points, {arch: DefaultCfg}: timm's register_model reads a
# module's `default_cfgs` (filled by register()).
default_cfgs: dict = {}


def _overrides(name: str, kwargs: dict) -> tuple[dict, bool, object]:
    """timm's options -> (create_model overrides, features_only, out_indices). Raises TypeError / ValueError
    for options the model does not have."""
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
    return kwargs, features_only, out_indices


def entrypoint(name: str):
    """The timm / torch.hub entry point of a preset: build(pretrained=False, **timm_or_crate_fast_options)."""
    def build(pretrained: bool = False, **kwargs):
        timm_args = {k: kwargs.pop(k, None) for k in _TIMM_ONLY}
        overrides, features_only, out_indices = _overrides(name, kwargs)
        if pretrained:
            model = _pretrained(name, overrides, **timm_args)
        else:
            tag = timm_args["pretrained_cfg"]
            if isinstance(tag, str) and tag:         # "arch.tag" without weights: the model its file needs (timm's way)
                overrides = {**hub.released_file(f"{name}.{tag}").overrides, **overrides}
            model = create_model(name, **overrides)
        if features_only:      # timm's feature extractor over forward_intermediates (last 3 blocks, as ViTs)
            from timm.models._features import FeatureGetterNet

            model.block_indices(out_indices)           # a bad choice fails here, not at the first forward
            return FeatureGetterNet(model, out_indices=out_indices, prune=False)
        return model

    build.__name__ = name
    build.__doc__ = f"crate_fast.create_model({name!r}) for timm.create_model (pretrained=True: its Hub weights)."
    build.__module__ = __name__
    return build


def _data_cfg(name: str, **overrides) -> dict:
    """A preset's own timm data config (TokenClassifier.pretrained_cfg), the model built on the meta device."""
    with torch.device("meta"):
        return dict(create_model(name, **overrides).pretrained_cfg)


def _strict_filter(row):
    """timm's pretrained_filter_fn: crate-fast's strict loader (official key map, position / stem resampling,
    a fresh head for another class count; its unused keys skipped), then the model's own state_dict."""
    def filter_fn(state_dict, model):
        try:
            load_weights(model, state_dict, reset_head="auto", ignore=list(row.ignore) if row else ())
        except TypeError as e:      # timm calls a filter again with one argument after a TypeError: keep this one
            raise ValueError(str(e)) from e
        return model.state_dict()
    return filter_fn


def _pretrained(name: str, overrides: dict, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None):
    """The preset with pretrained weights: timm's build_model_with_cfg with crate-fast's loader as its filter;
    crate_fast.hub.create_model where timm is missing or does not serve the family (torch.hub)."""
    try:
        from timm.models import build_model_with_cfg, get_pretrained_cfg, resolve_pretrained_cfg
        from timm.models._hub import hf_split
    except ImportError:
        build_model_with_cfg = None
    if build_model_with_cfg is None or not family_of(name).timm:
        if pretrained_cfg or pretrained_cfg_overlay:
            raise TypeError(f"pretrained_cfg / pretrained_cfg_overlay need timm serving {name}")
        return hub.create_model(name, pretrained=True, cache_dir=cache_dir, **overrides)
    if not pretrained_cfg and get_pretrained_cfg(name) is None:
        pretrained_cfg = _data_cfg(name, **overrides)      # no tag: the model's data config; the overlay has the source
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if not cfg.has_weights:
        raise hub.not_on_hub(name, hub.released_file(name))
    repo, revision = hf_split(cfg.hf_hub_id) if cfg.hf_hub_id else (None, None)
    row = next((r for r in RELEASED.values() if (r.hub_repo, r.hub_file) == (repo, cfg.hf_hub_filename)), None)
    try:
        return build_model_with_cfg(lambda **kw: create_model(name, **kw), name, True, pretrained_cfg=pretrained_cfg,
                                    pretrained_cfg_overlay=pretrained_cfg_overlay,
                                    pretrained_filter_fn=_strict_filter(row), cache_dir=cache_dir, **overrides)
    except hub.fetch_errors() as e:
        if repo is None:
            raise
        raise hub.fetch_error(repo, [cfg.hf_hub_filename] if cfg.hf_hub_filename else [], revision, cache_dir, e,
                              url=row.url if row else "") from None


def _tag_cfg(row) -> dict:
    """timm's pretrained cfg of a released file: its model's data config and its place on the Hub."""
    return {**_data_cfg(row.arch, **row.overrides),
            "hf_hub_id": f"{row.hub_repo}@{row.hub_revision}" if row.hub_revision else row.hub_repo,
            "hf_hub_filename": row.hub_file, "origin_url": row.url, "description": row.file,
            **({"license": row.license} if row.license else {})}


def timm_models() -> list[str]:
    """The presets timm serves: those of every family that declares it (the image classifiers; CRATE-MAE
    is a masked autoencoder, outside timm's classifier contract)."""
    return sorted(n for f in FAMILIES.values() if f.timm for n in list_models(f.name))


def register() -> bool:
    """Register every classifier preset with timm, with the pretrained tags of crate_fast.RELEASED
    (idempotent). Returns False when timm is missing."""
    try:
        from timm.models import generate_default_cfgs, is_model, register_model
    except ImportError:
        return False
    served = timm_models()
    tags = {t: r for t, r in hub.pretrained_tags().items() if r.arch in served}
    default_cfgs.update(generate_default_cfgs({t: _tag_cfg(r) for t, r in tags.items()}))
    for name in served:
        if not is_model(name):
            register_model(entrypoint(name))
    return True
