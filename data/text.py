"""Token data for the language models: nanoGPT's format, the embedded corpus, and random-window loaders.

- A directory holding ``train.bin`` and ``val.bin``: uint16 token ids, nanoGPT's ``prepare.py`` format
  (its OpenWebText and Shakespeare files load as they are), and optionally ``meta.json``
  {"tokenizer": "bytes" | "gpt2", "vocab_size": n}; without it the tokens are taken as GPT-2 BPE ids
  (vocab 50257, nanoGPT's OpenWebText). nanoGPT's own ``meta.pkl`` is never read (a pickle).
- ``pydocs``, the embedded default: the docstrings of the Python standard library this interpreter
  ships, read from its source files with ``ast`` (nothing is imported or run): about 1.8 MB of real
  English about code, as UTF-8 bytes (vocab 256). Files whose path hashes to 0 mod 10 are the
  validation split. Written once into the cache as train.bin / val.bin + meta.json.
- :class:`TokenWindows`: batches of random windows, x = tokens[i : i + T] and y = tokens[i + 1 : i + 1 + T]
  (int64, on the device). A training pass draws `steps` batches from numpy's generator seeded by (seed,
  epoch, rank): each rank reads its own windows (sharded by global rank), one seed gives one run, and
  ``set_epoch`` replays an epoch exactly (resume). Validation passes read the same `steps` batches every
  time (seeded by seed and rank).
"""
from __future__ import annotations

import ast
import gc
import hashlib
import json
import logging
import os
import platform
import sysconfig

import numpy as np
import torch

from .prepare import cache_lock

log = logging.getLogger(__name__)

TOKENIZERS = {"bytes": 256, "gpt2": 50257}            # name -> vocabulary size
PYDOCS_VERSION = 1                                    # bump when the corpus extraction changes
_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): encode(str) -> list[int], decode(ids) -> str (invalid UTF-8
    shown as U+FFFD, as a sample can end inside a character)."""

    name, vocab_size = "bytes", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tokenizer(name: str):
    """The tokenizer of a token data set: "bytes" (ours), or "gpt2" through tiktoken (optional; it fetches
    GPT-2's BPE files once into its own cache). Raises ValueError for another name, ImportError when
    tiktoken is missing."""
    if name == "bytes":
        return ByteTokenizer()
    if name != "gpt2":
        raise ValueError(f"tokenizer must be one of {sorted(TOKENIZERS)}, got {name!r}")
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError("GPT-2 BPE text needs tiktoken: pip install tiktoken") from e
    return tiktoken.get_encoding("gpt2")


def read_meta(directory: str) -> dict:
    """{"tokenizer", "vocab_size"} of a token directory: its meta.json, else GPT-2's (nanoGPT's OWT)."""
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        return {"tokenizer": "gpt2", "vocab_size": TOKENIZERS["gpt2"]}
    with open(path) as f:
        meta = json.load(f)
    if meta.get("tokenizer") not in TOKENIZERS or not isinstance(meta.get("vocab_size"), int):
        raise ValueError(f"{path}: expected {{'tokenizer': one of {sorted(TOKENIZERS)}, 'vocab_size': int}}, "
                         f"got {meta}")
    return meta


# ---------------------------------------------------------------------------------------------------
# The embedded corpus
# ---------------------------------------------------------------------------------------------------
def parse_source(source: str) -> ast.Module:
    """ast.parse(source) with the garbage collector paused. CPython 3.11's AST constructor keeps its
    recursion count in interpreter-wide state: a collection during the conversion can run a finalizer that
    releases the GIL, another thread's ast.parse (3.11's traceback module calls one to place its carets)
    then resets that count, and ours raises SystemError "AST constructor recursion depth mismatch" (it
    failed a CI run). With the collector paused this call's conversion runs no Python code, so no other
    thread interleaves with it (the pause is process-wide and ends with the call). Raises what ast.parse
    raises (SyntaxError, ValueError)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def pydocs_text() -> dict[str, str]:
    """{"train": text, "val": text}: the standard library's docstrings (module docstring), in file order."""
    root = sysconfig.get_paths()["stdlib"]
    parts = {"train": [], "val": []}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = parse_source(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue                                # a few files are templates or other encodings
            docs = [ast.get_docstring(n, clean=True) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            rel = os.path.relpath(path, root).encode()
            split = "val" if int(hashlib.sha1(rel).hexdigest(), 16) % 10 == 0 else "train"
            parts[split] += [d for d in docs if d]
    return {split: "\n\n".join(texts) + "\n" for split, texts in parts.items()}


def write_tokens(ids, path: str) -> None:
    """uint16 token ids to `path` (nanoGPT's .bin), atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        np.asarray(ids, dtype=np.uint16).tofile(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pydocs_dir(cache_dir: str) -> str:
    """The directory of the embedded corpus's train.bin / val.bin / meta.json, written on first use (under
    a lock: several processes sharing the cache write it once)."""
    entry = os.path.join(cache_dir, f"pydocs-v{PYDOCS_VERSION}-py{platform.python_version()}")
    done = os.path.join(entry, "meta.json")
    if os.path.isfile(done):
        return entry
    os.makedirs(entry, exist_ok=True)
    with cache_lock(cache_dir, os.path.basename(entry)):
        if not os.path.isfile(done):
            log.info("writing the embedded text corpus (the standard library's docstrings) into %s", entry)
            tok = ByteTokenizer()
            for split, text in pydocs_text().items():
                write_tokens(tok.encode(text), os.path.join(entry, f"{split}.bin"))
            with open(done + ".tmp", "w") as f:
                json.dump({"tokenizer": "bytes", "vocab_size": 256, "source": "pydocs"}, f)
            os.replace(done + ".tmp", done)
    return entry


def token_paths(directory: str) -> dict[str, str]:
    """{split: path} of a token directory's train.bin and val.bin. Raises FileNotFoundError."""
    paths = {s: os.path.join(directory, f"{s}.bin") for s in ("train", "val")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (a token directory holds train.bin and val.bin)")
    return paths


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------
class TokenWindows:
    """Batches (x, y) of `batch_size` random windows of `block_size` tokens from a uint16 token file
    (module docstring): x, y (batch_size, block_size) int64 on `device`, y = x shifted by one token.

    train: a pass draws `steps` new batches per epoch (set_epoch); else the same `steps` batches every
    pass. rank / world: this rank's windows (its seed). Raises ValueError when the file holds fewer than
    block_size + 1 tokens."""

    def __init__(self, path: str, *, batch_size: int, block_size: int, steps: int, device, seed: int = 0,
                 rank: int = 0, train: bool = True):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than one window of {block_size + 1}")
        self.batch_size, self.block_size, self.steps = batch_size, block_size, steps
        self.device, self.seed, self.rank, self.train, self.epoch = torch.device(device), seed, rank, train, 0

    def __len__(self) -> int:
        return self.steps

    @property
    def num_samples(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Make the next training pass draw epoch `epoch`'s windows (exact resume)."""
        self.epoch = epoch

    def __iter__(self):
        key = (self.seed, self.epoch, self.rank) if self.train else (self.seed, 2 ** 31, self.rank)
        rng, t = np.random.default_rng(key), self.block_size
        if self.train:
            self.epoch += 1                   # as the image loaders: each pass starts the next epoch
        for _ in range(self.steps):
            starts = rng.integers(0, len(self.tokens) - t, size=self.batch_size)
            window = torch.from_numpy(np.stack([self.tokens[i:i + t + 1] for i in starts]).astype(np.int64))
            window = window.to(self.device, non_blocking=True)
            yield window[:, :-1], window[:, 1:]
