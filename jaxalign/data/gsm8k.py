"""GSM8K (TFDS's `gsm8k`) as a source of RL prompts with answers.

Each record becomes `{"prompt": question, "answer": final answer}`, where the
final answer is the text after `####` in the worked solution (TFDS stores it
as `short_answer`), stripped of surrounding whitespace and otherwise
unchanged (numeric normalisation, e.g. dropping thousands separators, is the
reward checker's business).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds

# Importing the module registers the `gsm8k` builder; without TensorFlow,
# `import tensorflow_datasets` alone does not.
import tensorflow_datasets.text.gsm8k  # noqa: F401  pylint: disable=unused-import


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class MappedSource(Sequence):
    """A random-access view that applies `fn` to each record of `source`."""

    def __init__(self, source: Any, fn: Callable[[Any], dict[str, Any]]):
        self._source = source
        self._fn = fn

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._fn(self._source[index])


def gsm8k_record(record: dict[str, Any]) -> dict[str, str]:
    """Maps one TFDS `gsm8k` record to `{"prompt", "answer"}`."""
    if "short_answer" in record:
        answer = _text(record["short_answer"])
    else:
        solution = _text(record["answer"])
        if "####" not in solution:
            raise ValueError(f"gsm8k answer without '####': {solution[:80]!r}")
        answer = solution.rsplit("####", 1)[1]
    return {"prompt": _text(record["question"]), "answer": answer.strip()}


def gsm8k_prompts(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> MappedSource:
    """GSM8K `split` (`"train"` or `"test"`) as `{"prompt", "answer"}` records.

    Reads an `array_record` build of TFDS's `gsm8k` from `data_dir`. With
    `download=True` TFDS downloads and builds it first (needs network).
    """
    source = tfds.data_source(
        "gsm8k",
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
        builder_kwargs={"file_format": "array_record"},
    )
    return MappedSource(source, gsm8k_record)
