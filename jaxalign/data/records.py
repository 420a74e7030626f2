"""Reading and validating local sample files (JSONL, and Parquet via pyarrow).

A sample file holds one sample per JSONL line (or Parquet row). Which fields a
sample needs depends on its kind (`SCHEMAS`). Every problem is reported as a
`DataError` whose message starts with `path:line:` (1-based; the row number
for Parquet) and says what is wrong, so a bad line in a million is found at
once. Nothing is skipped silently: blank JSONL lines hold no sample and are
the only thing passed over without a word.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

SCHEMAS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_answer": ("prompt", "answer"),
}

# Fields that must hold more than whitespace; the `empty` policy applies to them.
# A prompt may be empty for SFT and preference data (unconditional text).
NONEMPTY_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("completion",),
    "preference": ("chosen", "rejected"),
    "prompt_answer": ("prompt", "answer"),
}

EMPTY_POLICIES = ("error", "drop", "keep")

# Bump when the stored record layout changes: it is part of the build fingerprint.
RECORD_FORMAT = "1"

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


class DataError(ValueError):
    """A sample file (or record) is not a valid sample; the message says where."""


class DataWarning(UserWarning):
    """Samples were changed or dropped by a documented policy (one per call)."""


def as_paths(paths: PathOrPaths) -> tuple[str, ...]:
    """Normalises one path or a sequence of paths to a tuple of absolute paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = tuple(os.path.abspath(os.fspath(p)) for p in paths)
    if not out:
        raise ValueError("no sample files given")
    return out


def check_kind(kind: str) -> tuple[str, ...]:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    return SCHEMAS[kind]


def validate_sample(obj: Any, kind: str, where: str) -> dict[str, str]:
    """Checks one decoded sample and returns its schema fields (extra keys dropped).

    Raises `DataError` naming `where` if `obj` is not an object, a field is
    missing or null, or a field is not a string.
    """
    fields = check_kind(kind)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    out = {}
    for name in fields:
        if name not in obj:
            raise DataError(f"{where}: missing field {name!r} (a {kind} sample needs {list(fields)})")
        value = obj[name]
        if value is None:
            raise DataError(f"{where}: field {name!r} is null")
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.40}"
            )
        out[name] = value
    return out


def empty_fields(sample: dict[str, str], kind: str) -> list[str]:
    """The fields of `sample` that must hold text but are empty or whitespace."""
    return [f for f in NONEMPTY_FIELDS[kind] if not sample[f].strip()]


def _jsonl_objects(path: str) -> Iterator[tuple[int, Any]]:
    """Yields (1-based line number, decoded JSON value) for every non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _parquet_objects(path: str) -> Iterator[tuple[int, Any]]:
    """Yields (1-based row number, row as a dict) of a Parquet file."""
    try:
        import pyarrow.parquet as pq  # optional: only Parquet input needs it
    except ImportError as e:
        raise ImportError(f"{path}: reading Parquet needs pyarrow") from e
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def read_samples(paths: PathOrPaths, kind: str, *, empty: str = "error") -> Iterator[dict[str, Any]]:
    """Yields validated samples of `kind` from JSONL (or `.parquet`) files.

    Each sample is a dict of the schema's string fields plus `source` (the
    file) and `line` (1-based line, or row for Parquet). Extra keys in the
    input are ignored. `empty` is what to do with a sample whose response
    field (`NONEMPTY_FIELDS`) is empty or whitespace: `"error"` raises,
    `"drop"` leaves it out and warns once at the end with the count and
    where they were, `"keep"` passes it on unchanged. A file with no samples
    is an error.
    """
    check_kind(kind)
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty={empty!r}; expected one of {EMPTY_POLICIES}")
    dropped: list[str] = []
    total = 0
    for path in as_paths(paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample file not found: {path}")
        rows = _parquet_objects(path) if path.endswith(".parquet") else _jsonl_objects(path)
        count = 0
        for number, obj in rows:
            where = f"{path}:{number}"
            sample = validate_sample(obj, kind, where)
            count += 1
            blank = empty_fields(sample, kind)
            if blank and empty == "error":
                raise DataError(
                    f"{where}: field {blank[0]!r} is empty (empty='error'; "
                    "pass empty='drop' to leave such samples out or 'keep' to keep them)"
                )
            if blank and empty == "drop":
                dropped.append(where)
                continue
            yield {**sample, "source": path, "line": number}
        if count == 0:
            raise DataError(f"{path}: no samples")
        total += count
    if dropped:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        warnings.warn(
            DataWarning(f"dropped {len(dropped)} of {total} {kind} samples with an empty field "
                        f"(empty='drop'): {shown}"),
            stacklevel=2,
        )


def fingerprint(paths: PathOrPaths, *extra: str) -> str:
    """A hex digest of the files' paths and contents plus `extra` strings.

    Equal fingerprints mean the same files with the same bytes, so a build
    made from them can be reused.
    """
    h = hashlib.sha256()
    for part in (RECORD_FORMAT, *extra):
        h.update(part.encode() + b"\0")
    for path in as_paths(paths):
        h.update(path.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
