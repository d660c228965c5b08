"""A command line read from a config dataclass: one flag per field (``--field-name``), typed by the
field's annotation, documented by the field's trailing comment (nanoGPT's "the config is the code", with
argparse instead of exec)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re


def _parse_tuple(kind):
    def parse(s):
        return tuple(kind(v) for v in s.replace(",", " ").split())
    return parse


def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class body, {field name: text}. Read from the source file's
    text, not inspect.getsource: its ast.parse fails at random on CPython 3.11.7 ("AST constructor
    recursion depth mismatch", a CPython bug), which broke a test run."""
    with open(inspect.getsourcefile(cls), encoding="utf-8") as f:
        source = f.read()
    body = source[source.index(f"class {cls.__name__}"):]
    body = body[:body.index("\n\n\n")]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#(.*)$", body, re.M)}


def parser_for(cls: type, description: str, aliases: dict[str, list[str]] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass `cls`: bools as --x / --no-x, int and
    float fields typed, (int, int, int) and (float, float) tuples as "A,B[,C]", the rest strings.
    aliases: {field: [more flag names]} (earlier names still accepted)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        t = f.type if isinstance(f.type, str) else str(f.type)
        kw = dict(default=f.default, help=helps.get(f.name, " "))
        if t.startswith("bool"):
            ap.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif "tuple[int, int, int]" in t:
            ap.add_argument(*flags, type=_parse_tuple(int), metavar="A,B,C", **kw)
        elif "tuple[float, float]" in t:
            ap.add_argument(*flags, type=_parse_tuple(float), metavar="A,B", **kw)
        elif t.startswith("int"):
            ap.add_argument(*flags, type=int, **kw)
        elif t.startswith("float"):
            ap.add_argument(*flags, type=float, **kw)
        else:
            ap.add_argument(*flags, type=str, **kw)
    return ap
