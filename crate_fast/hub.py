"""Released weights from the Hugging Face Hub, and Hub-ready models and runs (docs/DESIGN.md §12).

- :func:`create_model`, crate_fast's front door: ``pretrained=False`` is crate_fast.registry's builder;
  ``pretrained=True`` builds the model a released file needs (crate_fast.RELEASED), downloads the file
  into the Hugging Face cache (at its pinned revision) and loads it strictly (crate_fast.load_weights).
  timm's pretrained tags (crate_fast.timm_models) and torch.hub load the same files the same way.
- :func:`save_pretrained`, :func:`from_pretrained`, :func:`push_to_hub` (also methods of every model:
  ``model.save_pretrained(dir)``, ``CRATE.from_pretrained(dir_or_repo_id)``): a folder or Hub repository
  holding ``config.json`` (the model's config fields and its family) and ``model.safetensors``
  (crate-fast's own keys; its metadata records the family and config, as crate_fast.save_weights writes
  it), the two files huggingface_hub's PyTorchModelHubMixin writes. A train.py run folder loads as it is.

Only ``pretrained=True``, :func:`from_pretrained` of a Hub repository id and :func:`push_to_hub` reach the
network, through huggingface_hub (optional: ``pip install crate-fast[hub]``); ``HF_HUB_OFFLINE=1`` reads
the local cache only. Files are read with ``torch.load(weights_only=True)`` or safetensors
(crate_fast.io). A file neither the Hub nor the cache can give raises one RuntimeError naming the
``hf download`` command that fetches it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import tempfile
from typing import Any

from torch import nn

from .checkpoint import load_model, load_weights, model_record, save_weights
from .io import atomic_write, read_weights
from .models import base
from .registry import FAMILIES, family_of
from .registry import create_model as build_model
from .released import RELEASED, ReleasedFile

CONFIG_NAME = "config.json"          # the names huggingface_hub's PyTorchModelHubMixin writes and reads
WEIGHTS_NAME = "model.safetensors"
_HEAD_FIELDS = {"num_classes"}       # what a file may change of the preset it loads into (reset_head)


# ---------------------------------------------------------------------------------------------------
# Which released file
# ---------------------------------------------------------------------------------------------------
def pretrained_tags() -> dict[str, ReleasedFile]:
    """{"arch.tag": file} of every released file with a timm pretrained tag (ReleasedFile.tag), in
    crate_fast.RELEASED's order (an arch's first tag is its default). Raises ValueError for a tagged file
    that is not on the Hub or whose overrides change more than num_classes (a tag loads into its arch)."""
    out = {}
    for r in RELEASED.values():
        if not r.tag:
            continue
        if not (r.hub_repo and r.hub_file):
            raise ValueError(f"RELEASED[{r.name!r}] has the timm tag {r.tag!r} but no hub_repo / hub_file")
        if set(r.overrides) - _HEAD_FIELDS:
            raise ValueError(f"RELEASED[{r.name!r}] has the timm tag {r.tag!r} but changes {sorted(r.overrides)} of "
                             f"{r.arch}: a tagged file loads into its arch, so it may change only num_classes")
        out[f"{r.arch}.{r.tag}"] = r
    return out


def released_file(name: str) -> ReleasedFile | None:
    """The released file ``create_model(name, pretrained=True)`` loads: the crate_fast.RELEASED row of that
    name, of timm's "arch.tag", or for a preset its first row (overrides changing only num_classes) on
    the Hub, else its first row elsewhere; None for a preset without one. Raises ValueError for an unknown
    name or tag."""
    if name in RELEASED:
        return RELEASED[name]
    arch, dot, tag = name.partition(".")
    family_of(arch)                                    # ValueError, with close matches, for an unknown model
    if dot:
        tags = pretrained_tags()
        if name not in tags:
            known = [t for t in tags if t.startswith(arch + ".")]
            raise ValueError(f"{arch} has no pretrained tag {tag!r}; its tags: {', '.join(known) or 'none'}")
        return tags[name]
    rows = [r for r in RELEASED.values() if r.arch == name and not set(r.overrides) - _HEAD_FIELDS]
    return next((r for r in rows if r.hub_repo), rows[0] if rows else None)


def not_on_hub(name: str, row: ReleasedFile | None) -> RuntimeError:
    """The error of ``pretrained=True`` for weights crate-fast cannot download: where to fetch them by hand."""
    if row is None:
        others = "".join(f"; {r.file} needs a {name} with {r.overrides}: " + (
            f"crate_fast.create_model({r.name!r}, pretrained=True) loads it" if r.hub_repo else
            f"fetch it by hand from {r.url or r.where}, then crate_fast.load_released(path) loads it")
            for r in RELEASED.values() if r.arch == name)
        return RuntimeError(f"no released weights exist for {name}{others}; load your own with "
                            "crate_fast.load_weights(model, path) or crate_fast.from_pretrained(run_dir)")
    # A Hub page without a commit crate-fast could pin is fetched by hand too: pretrained=True downloads
    # only pinned revisions, so the same name always gives the same bytes.
    on_hub = row.url.startswith("https://huggingface.co/")
    where = ("is on the Hugging Face Hub at no commit crate-fast has pinned" if on_hub
             else "is not on the Hugging Face Hub")
    return RuntimeError(f"{row.file} {where} (crate_fast.RELEASED[{row.name!r}]), so crate-fast "
                        f"does not download it: fetch it by hand from {row.url or row.where} ({row.where}), then "
                        "model = crate_fast.load_released(path) builds its model and loads it")


# ---------------------------------------------------------------------------------------------------
# Downloading (huggingface_hub, optional)
# ---------------------------------------------------------------------------------------------------
def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError("loading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub "
                          "(or crate-fast[hub])") from e
    return huggingface_hub


def fetch_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's errors for a file neither the Hub nor the local cache can give (a cache miss offline
    or without a network, a missing repository, revision or file); () without huggingface_hub."""
    try:
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:
        return ()
    return EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled


def fetch_error(repo: str, files: list[str], revision: str | None, cache_dir: Any, cause: BaseException, *,
                url: str = "", note: str = "") -> RuntimeError:
    """The one error of a failed download: what was asked, why it failed, and the ``hf download`` command."""
    what = f"{' and '.join(files) or 'the files'} of {repo}" + (f" at revision {revision}" if revision else "")
    mode = " (HF_HUB_OFFLINE is set: the cache only)" if _huggingface_hub().constants.HF_HUB_OFFLINE else ""
    why = (str(cause).strip().splitlines() or [""])[0]
    command = shlex.join(["hf", "download", repo, *files] + (["--revision", revision] if revision else [])
                         + (["--cache-dir", os.fspath(cache_dir)] if cache_dir else []))
    lines = [f"could not get {what} from the Hugging Face Hub or the local cache{mode}: {type(cause).__name__}"
             + (f": {why}" if why else ""),
             f"fetch it once where the Hub is reachable: {command}  (HF_HUB_OFFLINE=1 then loads it from the cache)"]
    if url:
        lines.append(f"or download it by hand from {url} and load it with crate_fast.load_released(path)")
    if note:
        lines.append(note)
    return RuntimeError("\n".join(lines))


def fetch(repo: str, filename: str, *, revision: str | None = None, cache_dir: Any = None, url: str = "",
          note: str = "", **hub_kwargs) -> str:
    """The local path of one file of a Hub repository (huggingface_hub.hf_hub_download: the HF cache, or
    ``cache_dir``; downloaded on a miss unless HF_HUB_OFFLINE=1). hub_kwargs: hf_hub_download's force_download,
    token, local_files_only. Raises :func:`fetch_error`'s RuntimeError, ImportError without huggingface_hub."""
    hf = _huggingface_hub()
    try:
        return hf.hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir, **hub_kwargs)
    except fetch_errors() as e:
        raise fetch_error(repo, [filename], revision, cache_dir, e, url=url, note=note) from None


def create_model(name: str, pretrained: bool = False, *, cache_dir: Any = None, **overrides) -> nn.Module:
    """Build a model by name; keywords override any field of its config (crate_fast.registry.create_model).
    pretrained=True: with its released weights, downloaded from the Hugging Face Hub.

    >>> model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4, impl="auto")
    >>> model = create_model("crate_alpha_base", pretrained=True)            # CRATE-alpha-B/16, IN-21K -> IN-1K
    >>> model = create_model("crate_alpha_large.in21k", pretrained=True, num_classes=10)   # a fresh 10-class head

    name: a preset, a crate_fast.RELEASED name, or timm's "arch.tag" (:func:`pretrained_tags`; the model its
    file needs). pretrained=True loads :func:`released_file`'s file: downloaded once into the Hugging Face
    cache (``cache_dir``, else huggingface_hub's) at its pinned revision, read with weights_only and loaded
    strictly by crate_fast.load_weights (official keys mapped; a position table or stem of another size
    resized; a head of another class count kept fresh; each reported). Nothing downloads otherwise.
    Raises ValueError for an unknown name; RuntimeError for weights crate-fast cannot download (naming
    where to fetch them by hand), a file neither the Hub nor the cache can give (naming the ``hf download``
    command) or weights that do not fit; ImportError without huggingface_hub.
    """
    row = released_file(name) if pretrained or "." in name else None
    if not pretrained:
        return build_model(row.name if row is not None else name, **overrides)
    if row is None or not row.hub_repo:
        raise not_on_hub(name, row)
    model = build_model(row.name, **overrides)           # bad overrides fail before any download
    path = fetch(row.hub_repo, row.hub_file, revision=row.hub_revision, cache_dir=cache_dir, url=row.url)
    return load_weights(model, path, reset_head="auto", ignore=list(row.ignore))


# ---------------------------------------------------------------------------------------------------
# Hub-ready folders: save_pretrained, push_to_hub, from_pretrained
# ---------------------------------------------------------------------------------------------------
def _model_card(family: str) -> str:
    fam = FAMILIES[family]
    return (f"---\nlibrary_name: crate-fast\ntags:\n- crate-fast\n- {family}\n---\n\n# {fam.title} (crate-fast)\n\n"
            f"A {fam.title} model ({fam.paper}) saved by crate-fast: `config.json` holds its config, "
            "`model.safetensors` its weights under crate-fast's names.\n\n```python\nimport crate_fast\n"
            "model = crate_fast.from_pretrained(\"<this repository or folder>\")\n```\n")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                    repo_id: str | None = None, **push_to_hub_kwargs) -> str | None:
    """Write the model as a Hub-ready folder: ``model.safetensors`` (crate_fast.save_weights: crate-fast's keys,
    the family and config in its metadata), ``config.json`` ({"family": ..., config fields}) and, unless the
    folder has one, a ``README.md`` model card. push_to_hub=True then uploads the folder to ``repo_id``
    (default: the folder's name; push_to_hub_kwargs as :func:`push_to_hub`'s). Returns the commit's URL when
    pushed, else None."""
    os.makedirs(save_directory, exist_ok=True)
    save_weights(model, os.path.join(save_directory, WEIGHTS_NAME))
    record = model_record(model)
    config = json.dumps({"family": record["family"], **record["model_config"]}, indent=2) + "\n"
    atomic_write(os.path.join(save_directory, CONFIG_NAME), lambda f: f.write(config.encode()))
    card = os.path.join(save_directory, "README.md")
    if not os.path.exists(card):
        atomic_write(card, lambda f: f.write(_model_card(record["family"]).encode()))
    if push_to_hub:
        return _upload(save_directory, repo_id or os.path.basename(os.path.abspath(save_directory)),
                       **push_to_hub_kwargs)
    return None


def _upload(folder: str | os.PathLike, repo_id: str, *, commit_message: str = "Upload a crate-fast model",
            private: bool | None = None, token: str | None = None, branch: str | None = None,
            create_pr: bool | None = None) -> str:
    api = _huggingface_hub().HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=branch,
                             create_pr=create_pr)


def push_to_hub(model: nn.Module, repo_id: str, **kwargs) -> str:
    """Upload the model as a Hub-ready folder (:func:`save_pretrained`'s files) to the Hub repository
    ``repo_id`` (created if missing) in one commit. kwargs: commit_message, private, token, branch,
    create_pr. Returns the commit's URL. Raises huggingface_hub's errors (OfflineModeIsEnabled at once under
    HF_HUB_OFFLINE=1), ImportError without huggingface_hub."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return _upload(tmp, repo_id, **kwargs)


def _weights_path(where: str, hub: dict) -> str:
    """The local model.safetensors of a folder, the file itself, or a Hub repository's (fetched)."""
    if os.path.isdir(where):
        path = os.path.join(where, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where!r} has no {WEIGHTS_NAME} (save_pretrained writes one; train.py writes it "
                                    "with the run's best model; a run folder without one has last.pt, which "
                                    "crate_fast.load_model reads)")
        return path
    if os.path.isfile(where):
        return where
    try:
        _huggingface_hub().utils.validate_repo_id(where)
    except (ImportError, ValueError):
        raise FileNotFoundError(f"{where!r} is no folder or file, nor a Hugging Face Hub repository id (org/name; "
                                "with huggingface_hub installed)") from None
    return fetch(where, WEIGHTS_NAME, note=f"({where!r} is no local folder or file, so it was taken as a Hub "
                 "repository id)", **hub)


def _config(where: str, weights_path: str, hub: dict) -> dict:
    """The folder's (or repository's) config.json; {} when a local folder has none."""
    if os.path.exists(where):
        path = os.path.join(os.path.dirname(weights_path), CONFIG_NAME)
        if not os.path.isfile(path):
            return {}
    else:
        path = fetch(where, CONFIG_NAME, **hub)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _family_for(name: str, model_class: type | None, where: str):
    """The family a file records, checked against the class asked for. Raises ValueError for a family this
    crate-fast does not know, TypeError for a model of another class."""
    if name not in FAMILIES:
        raise ValueError(f"{where!r} holds a model of the family {name!r}, which this crate-fast does not know")
    fam = FAMILIES[name]
    if model_class is not None and not issubclass(fam.model_class, model_class):
        raise TypeError(f"{where!r} holds a {fam.title} model ({fam.model_class.__name__}), not a "
                        f"{model_class.__name__}: load it with crate_fast.from_pretrained (any family) or "
                        f"{fam.model_class.__name__}.from_pretrained")
    return fam


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, *, model_class: type | None = None,
                    impl: str = "auto", revision: str | None = None, cache_dir: Any = None,
                    force_download: bool = False, token: str | bool | None = None,
                    local_files_only: bool = False) -> nn.Module:
    """The model a Hub-ready folder or repository holds, built and loaded strictly, whatever its family.

    >>> model = crate_fast.from_pretrained("runs/digits")                  # a train.py run folder, as it is
    >>> model = crate_fast.CRATE.from_pretrained("org/my-crate", revision="main")    # a Hub repository

    pretrained_model_name_or_path: a folder (save_pretrained's, or a train.py run's: config.json holds the
    run's flags, model.safetensors records the model), a weight file, or a Hub repository id (its files
    fetched into the HF cache: revision, cache_dir, force_download, token, local_files_only as
    huggingface_hub.hf_hub_download's). The model comes from model.safetensors' record; a file without one
    takes it from config.json (a model config with "family", or a run's flags with "arch").
    model_class: the class asked for (``CRATE.from_pretrained``); impl: crate_fast.kernels.IMPLS.
    Raises FileNotFoundError, TypeError (a model of another class), ValueError (a folder that does not say
    which model it holds), RuntimeError (a file the Hub or the cache cannot give: the hf download command;
    weights that do not fit).
    """
    where = os.fspath(pretrained_model_name_or_path)
    hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
               local_files_only=local_files_only)
    w = read_weights(_weights_path(where, hub))
    if w.family is None or w.model_config is None:
        config = _config(where, w.source, hub)
        if "family" in config:                 # save_pretrained's config.json beside a file without a record
            fields = {k: v for k, v in config.items() if k != "family"}
            w = dataclasses.replace(w, family=config["family"], model_config=fields)
        elif "arch" in config:                 # a train.py run's flags
            _family_for(family_of(config["arch"]).name, model_class, where)
            return load_model(dataclasses.replace(w, run_config=config), impl=impl)
        else:
            raise ValueError(f"{where!r} does not say which model it holds: its weights record none (save_weights and "
                             "save_pretrained write the record) and it has no config.json with a \"family\" "
                             "(save_pretrained's) or an \"arch\" (train.py's); load them with "
                             "crate_fast.load_model(path, arch)")
    _family_for(w.family, model_class, where)
    return load_model(w, impl=impl)


base.provide_hub(sys.modules[__name__])        # CRATEModel.save_pretrained / from_pretrained / push_to_hub
