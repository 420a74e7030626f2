"""Metric writers: console lines, a JSONL file, TensorBoard event files.

Every writer takes `write(step, metrics)` with a flat dict of Python floats and
`close()`. On resume, a writer drops what was logged after the restored step,
so the files read like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import tqdm


class ConsoleWriter:
    """One line per call, printed through tqdm so the progress bar survives."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
        tqdm.tqdm.write(f"step {step}: {parts}")

    def close(self) -> None:
        pass


class JsonlWriter:
    """Appends `{"step": step, **metrics}` rows to `path`, flushed per row.

    resume_step: rows with a larger step (logged after the checkpoint that a
    resumed run starts from) are removed when the writer opens.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in read_jsonl(path) if r["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(path, "a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        # json cannot encode NaN portably; null keeps the row parseable.
        row = {"step": step, **{k: (None if _bad(v) else v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars into TensorBoard event files (tensorboardX, no TensorFlow)."""

    def __init__(self, logdir: str, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(logdir, purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_jsonl(path: str) -> list[dict]:
    """All rows of a metrics file; a torn last line (killed writer) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _bad(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
