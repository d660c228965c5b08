"""The class names of a .beton, kept in a small JSON file next to it: OUT.beton -> OUT.beton.classes.json.

A .beton stores each label as an index only: the position of the image's class in the class list of
whatever wrote it (for an image folder, that split's own sorted folder names). A train.beton and a
val.beton written from folders with different class folders therefore give one index two meanings,
silently. The writer (writer.write_beton, given `classes`) records the names, and the readers of a
train/val pair (sources.py) compare them.

Why a separate file: FFCV's format has no free metadata field. Its header holds only the version,
field count, page size, sample count and the allocation table's offset; each field's descriptor
holds its type, a 16-byte name and the field's own arguments; everything else is per-sample data
(ffcv/types.py). Class names stored as a field would be repeated in every sample, and a reader built
for (image, label) files would no longer take the file.

The record also holds the .beton's size in bytes (and, for people, its sample count): a record of
another size than its .beton (the .beton was rewritten by another tool, or replaced without its
record) is ignored, as if absent, rather than trusted. write_beton puts the record in place just
before the .beton (each by an atomic rename), so a complete .beton written with class names always
has its record.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

SUFFIX = ".classes.json"
FORMAT = 1


def record_path(beton: str) -> str:
    """Where the class-name record of the .beton at `beton` lives: `beton` + '.classes.json'."""
    return beton + SUFFIX


def check_class_names(classes: Sequence[str]) -> list[str]:
    """`classes` as a list, after checking that it holds distinct strings. Raises ValueError otherwise."""
    names = list(classes)
    if not all(isinstance(c, str) for c in names):
        raise ValueError(f"class names must be strings, got {[type(c).__name__ for c in names][:5]}")
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct; repeated: "
                         + ", ".join(sorted({c for c in names if names.count(c) > 1})[:10]))
    return names


def write_record(path: str, classes: Sequence[str], *, beton: str, num_samples: int) -> None:
    """Write the record of the finished .beton file `beton` (its size and `num_samples` are recorded) to
    `path`. The caller renames it into place (write_beton: a temporary name in its own folder)."""
    record = {"format": FORMAT, "classes": check_class_names(classes), "num_samples": int(num_samples),
              "beton_bytes": os.path.getsize(beton), "written_by": "crate_fast.data.writer"}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def beton_classes(beton: str) -> list[str] | None:
    """The class names recorded with the .beton at `beton` (label i is the i-th name), or None when it
    has no usable record: none was written (another tool, or crate-fast before records), or the record
    does not match the file (another size) or cannot be read. Never raises for a missing or bad
    record; the reason goes to the debug log."""
    path = record_path(beton)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record["classes"], list):
            raise TypeError(f"classes is a {type(record['classes']).__name__}, not a list")
        classes = check_class_names(record["classes"])
        size = os.path.getsize(beton)
        if record["beton_bytes"] != size:
            log.debug("%s describes a file of %s bytes, %s has %d: ignored", path, record["beton_bytes"], beton, size)
            return None
        return classes
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("cannot read the class-name record %s (%s: %s): ignored", path, type(e).__name__, e)
        return None
