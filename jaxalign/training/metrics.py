"""Metric writers: console lines, a JSONL file, TensorBoard event files.

Every writer takes `write(step, metrics)` with a flat dict of Python floats and
`close()`. On resume, a writer drops what was logged after the restored step,
so the files read like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
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
    resumed run starts from) are removed when the writer opens; the file is
    rewritten aside and renamed over, so an interruption there loses no row.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in read_jsonl(path) if r["step"] <= resume_step]
            # Written aside and renamed over: a run killed here keeps the old file whole.
            tmp = f"{path}.tmp.{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._file = open(path, "a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        # json cannot encode NaN portably; null keeps the row parseable.
        row = {"step": step, **{k: (None if _bad(v) else v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars into a TensorBoard event file, written and flushed in the caller's thread.

    tensorboardX's `SummaryWriter` hands events to a background thread, and its
    `flush()` flushes only what that thread has already written: an event still
    in the queue is lost when the process is killed, even after `flush()`. This
    writer uses tensorboardX's record format and protos but no thread, so a
    step that `write` returned from is on disk.

    resume_step: the run restarts after this step. The new file starts with the
    session-restart marker at `resume_step + 1`, so TensorBoard hides what an
    earlier file logged from that step on.
    """

    def __init__(self, logdir: str, resume_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        os.makedirs(logdir, exist_ok=True)
        self._event, self._scalar = Event, scalar  # imported here: tensorboardX loads only with a workdir
        # The file is named by the second it opens in and the host; the suffix
        # keeps a resume within that second from truncating the earlier file.
        self._file = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}.{time.time_ns()}")
        if resume_step is not None:
            self._file.write_event(Event(step=resume_step + 1, wall_time=time.time(),
                                         session_log=SessionLog(status=SessionLog.START)))
        self._file.flush()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.time()
        for k, v in metrics.items():
            self._file.write_event(self._event(step=step, wall_time=now, summary=self._scalar(k, v)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
