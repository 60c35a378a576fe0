"""Item metadata: what the sources attach to an item, and the values instruction templates read from it.

An item's `metadata` (a JSON object, written to every row) comes from where
the item was listed or stored:

- manifest columns: a CSV or Parquet manifest's columns other than the URI
  column, one key per column (empty CSV cells and nulls are left out);
- tar sidecars: the sample's `.json`/`.txt`/... members, one key per
  extension (`{"json": {...}, "txt": "..."}`);
- Parquet pass-through columns (`--parquet_passthrough_columns`).

A tar member or Parquet row listed by a manifest gets both: its own keys
win over the manifest row's on a clash (`merge`).

Templates name values with `{key}`; `ItemValues` looks them up:

1. `key` is a top-level key (a manifest or pass-through column, a sidecar's
   extension): its value.
2. Otherwise `key` inside the object-valued top-level entries (a tar
   sample's JSON sidecar, a struct column): found in exactly one, its
   value; found in several, an ambiguous name (`AmbiguousValue`), which the
   full path resolves.
3. `a.b.c` walks into objects (and `items.0` into lists) from step 1 or 2;
   a top-level key holding dots (a `meta.json` sidecar) is matched whole
   first, the longest such key winning.

Values are used as text: strings as they are, numbers, booleans, lists and
objects as compact JSON. A missing key or a null is `MissingValue`.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional


class PromptError(ValueError):
    """An instruction that cannot be built for an item: its task gets a `prompt` error row."""


class MissingValue(PromptError):
    """A placeholder the item has no value for."""


class AmbiguousValue(PromptError):
    """A short placeholder name found in several of the item's objects."""


def encode(values: Mapping[str, Any]) -> Optional[str]:
    """Metadata as the rows carry it: a JSON object, keys sorted; None when there is nothing."""
    return json.dumps(dict(values), sort_keys=True, ensure_ascii=False, default=str) if values else None


def decode(metadata: Optional[str]) -> dict[str, Any]:
    """The metadata object of an item ({} when it has none or it is not an object)."""
    value = json.loads(metadata) if metadata else {}
    return value if isinstance(value, dict) else {}


def merge(outer: Optional[str], inner: Optional[str]) -> Optional[str]:
    """`outer` (a manifest row's columns) with `inner` (a member's sidecars, a row's columns) on top."""
    if not outer or not inner:
        return inner or outer
    return encode({**decode(outer), **decode(inner)})


def as_text(value: Any) -> str:
    """A metadata value as a template shows it."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _describe(values: Mapping[str, Any]) -> str:
    if not values:
        return "the item has no metadata"
    keys = ", ".join(sorted(values))
    nested = [f"{key}: {', '.join(sorted(value))}" for key, value in sorted(values.items()) if isinstance(value, dict) and value]
    return f"the item's metadata keys are {keys}" + (f" ({'; '.join(nested)})" if nested else "")


class ItemValues:
    """The values one item offers to instruction templates (lookup rules in the module docstring)."""

    def __init__(self, metadata: Optional[str]):
        self._values = decode(metadata)

    def _start(self, name: str) -> tuple[Any, list[str]]:
        """The value the path starts from, and the steps left to walk."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self._values:
                return self._values[".".join(parts[:end])], parts[end:]
        key = parts[0]
        holders = [top for top, value in self._values.items() if isinstance(value, dict) and key in value]
        if len(holders) > 1:
            raise AmbiguousValue(
                f"{{{name}}} is ambiguous: {key!r} is a key of {', '.join(holders)}; "
                f"name one, e.g. {{{holders[0]}.{name}}}"
            )
        if not holders:
            raise MissingValue(f"no value for {{{name}}}: {_describe(self._values)}")
        return self._values[holders[0]][key], parts[1:]

    def get(self, name: str) -> str:
        """The text for placeholder `name` (`key` or a dotted path), or MissingValue/AmbiguousValue."""
        value, rest = self._start(name)
        for index, step in enumerate(rest):
            if isinstance(value, dict) and step in value:
                value = value[step]
            elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
                value = value[int(step)]
            else:
                walked = name.rsplit(".", len(rest) - index)[0]
                raise MissingValue(f"no value for {{{name}}}: {walked} has no {step!r}")
        if value is None:
            raise MissingValue(f"no value for {{{name}}}: it is null for this item")
        return as_text(value)

    def get_or_none(self, name: str) -> Optional[str]:
        """`get`, with None for a value the item does not have (fingerprints of tasks that will fail)."""
        try:
            return self.get(name)
        except PromptError:
            return None
