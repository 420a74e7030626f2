"""The generic training loop: steps, logging, evaluation, checkpoints, plots."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm

from jaxalign.training import metrics as mw
from jaxalign.training.checkpoint import Checkpointer, NonFiniteError
from jaxalign.training.plots import save_plots
from jaxalign.training.state import TrainState
from jaxalign.training.step import TrainStep

EvalFn = Callable[[TrainState, int], dict]


def count_tokens(batch: Any) -> int | None:
    """Tokens in a host batch: `num_tokens` if present, else the sum of
    `attention_mask` (or `mask`), else None (no tokens/s shown)."""
    if not isinstance(batch, dict):
        return None
    for key in ("num_tokens", "attention_mask", "mask"):
        if key in batch:
            return int(np.sum(np.asarray(batch[key])))
    return None


def train(
    step_fn: TrainStep,
    state: TrainState,
    data: Iterator,
    *,
    num_steps: int,
    workdir: str | None = None,
    checkpointer: Checkpointer | None = None,
    eval_fn: EvalFn | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    console: bool = True,
    progress: bool = True,
    tokens_fn: Callable[[Any], int | None] = count_tokens,
    max_skipped_fraction: float | None = None,
) -> tuple[TrainState, list[dict]]:
    """Runs `step_fn` until `state.step == num_steps`; returns (state, rows).

    data: iterator of host batches (this process's rows). If it has
      `get_state()`/`set_state(dict)`, its position is checkpointed with the
      state and restored on resume.
    checkpointer: if it holds a checkpoint, the run resumes from the newest
      intact one (state, rng, optimizer, data position; a damaged newer step
      is handled by its `on_corrupt` policy); it saves on its interval and at
      the end.
    eval_fn(state, step) -> metrics: run every `eval_every` steps (0: only at
      the end), logged as `eval/<name>`.
    log_every: train metrics (loss, grad_norm, lr, …, tokens_per_sec) are
      fetched, written and shown every this many steps and at the last step.
    workdir: where `metrics.jsonl`, `tensorboard/` and `plots/*.png` go
      (process 0 only); None writes no files.
    max_skipped_fraction: stop (NonFiniteError) when more than this fraction
      of the updates so far were dropped as non-finite (`skipped_steps /
      step` of the state), checked whenever metrics are fetched and before
      each save, from update 1 / max_skipped_fraction on (so one skip never
      stops a run). None: never.
    Raises NonFiniteError at the first non-finite step if the step was built
    with `nan_policy="stop"`, before that step could be checkpointed.
    Prints (process 0) one line per checkpoint saved, `resumed from step N`
    or `fell back to step N: <reason>`, and at the end a summary of the
    skipped steps, also when the run ends with an error.
    Returns the rows logged by this call (process 0; empty elsewhere).
    """
    if max_skipped_fraction is not None and not 0 < max_skipped_fraction <= 1:
        raise ValueError(f"train.max_skipped_fraction must be in (0, 1], got {max_skipped_fraction}")
    lead = jax.process_index() == 0
    say = tqdm.tqdm.write if lead else (lambda line: None)
    start = 0
    resumed = checkpointer.resume(state) if checkpointer is not None else None
    if resumed is not None:
        # The checkpoint's step is the loop's; `state.step` counts optimiser
        # updates, which differ when a step function updates several times
        # per call (PPO epochs, GRPO's mu).
        state, start = resumed.state, resumed.step
        if resumed.data_state is not None and hasattr(data, "set_state"):
            data.set_state(resumed.data_state)
        elif hasattr(data, "set_state"):
            say("warning: checkpoint has no data state: data restarts from its current position")
        if resumed.fell_back:
            say(f"fell back to step {start}: " + " | ".join(resumed.fell_back))
        else:
            say(f"resumed from step {start} ({checkpointer.directory})")
    skips = _SkipLedger(state, max_skipped_fraction)

    writers = _open_writers(workdir, console, start) if lead else []
    bar = tqdm.tqdm(initial=start, total=num_steps, disable=not (progress and lead), dynamic_ncols=True)
    rows: list[dict] = []
    tokens, t0 = 0, time.perf_counter()
    steps_in_window = 0
    try:
        for step in range(start + 1, num_steps + 1):
            batch = next(data)
            n_tok = tokens_fn(batch)
            state, metrics = step_fn(state, batch)
            skips.add(step, metrics)
            if step_fn.nan_policy == "stop" and not bool(metrics["finite"]):
                raise NonFiniteError(_non_finite_message(step, jax.device_get(metrics)))
            if step == start + 1:
                # Leave the compile out of the throughput window.
                jax.block_until_ready(metrics)
                tokens, t0, steps_in_window = 0, time.perf_counter(), 0
            else:
                tokens += (n_tok or 0) * jax.process_count()
                steps_in_window += 1
            row: dict[str, float] = {}
            if step % log_every == 0 or step == num_steps:
                row.update(_to_floats(jax.device_get(metrics)))
                dt = time.perf_counter() - t0
                if steps_in_window and dt > 0:
                    row["steps_per_sec"] = steps_in_window / dt
                    if n_tok is not None:
                        row["tokens_per_sec"] = tokens / dt
                tokens, t0, steps_in_window = 0, time.perf_counter(), 0
                bar.set_postfix(_postfix(row))
            if eval_fn is not None and (
                (eval_every and step % eval_every == 0) or step == num_steps
            ):
                t_eval = time.perf_counter()
                evals = _to_floats(jax.device_get(eval_fn(state, step)))
                row.update({f"eval/{k}": v for k, v in evals.items()})
                t0 += time.perf_counter() - t_eval  # keep eval out of the throughput
            if row and lead:
                rows.append({"step": step, **row})
                for w in writers:
                    if isinstance(w, mw.ConsoleWriter) and not (step % log_every == 0 or step == num_steps):
                        continue
                    w.write(step, row)
            saving = checkpointer is not None and (step == num_steps or step % checkpointer.save_every == 0)
            if saving or step % log_every == 0 or step == num_steps:
                skips.check(step, state)  # before the save: a run that skips too much keeps its last good checkpoint
            if saving:
                t_save = time.perf_counter()
                data_state = data.get_state() if hasattr(data, "get_state") else None
                if checkpointer.save(step, state, data_state):
                    say(f"saved checkpoint step {step} ({checkpointer.directory})")
                t0 += time.perf_counter() - t_save
            bar.update(1)
    finally:
        bar.close()
        say(skips.summary())
        if checkpointer is not None:
            checkpointer.wait()
        for w in writers:
            w.close()
    if lead and workdir is not None:
        all_rows = mw.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        save_plots(all_rows, os.path.join(workdir, "plots"))
    return state, rows


def _open_writers(workdir: str | None, console: bool, resume_step: int) -> list:
    writers: list = [mw.ConsoleWriter()] if console else []
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        writers.append(mw.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step))
        writers.append(mw.TensorBoardWriter(os.path.join(workdir, "tensorboard"), resume_step))
    return writers


class _SkipLedger:
    """Which loop steps the NaN guard dropped (fetched lazily, at log and save steps) and the
    `max_skipped_fraction` stop, from the state's own counters (restored with it on resume)."""

    def __init__(self, state: Any, max_fraction: float | None):
        self.max_fraction = max_fraction
        self.before = int(jax.device_get(getattr(state, "skipped_steps", 0)))
        self.pending: list[tuple[int, Any]] = []
        self.steps: list[int] = []
        self.updates = self.skipped = None

    def add(self, step: int, metrics: dict) -> None:
        if "finite" in metrics:
            self.pending.append((step, metrics["finite"]))

    def _drain(self) -> None:
        if self.pending:
            flags = jax.device_get([f for _, f in self.pending])
            self.steps += [s for (s, _), ok in zip(self.pending, flags) if not bool(ok)]
            self.pending = []

    def check(self, step: int, state: Any) -> None:
        self._drain()
        if not hasattr(state, "skipped_steps"):
            return
        self.updates, self.skipped = (int(x) for x in jax.device_get((state.step, state.skipped_steps)))
        f = self.max_fraction
        if f is not None and self.updates >= 1 / f and self.skipped > f * self.updates:
            raise NonFiniteError(
                f"stopping at step {step}: {self.skipped} of {self.updates} updates were dropped as non-finite, "
                f"more than train.max_skipped_fraction={f}; the last checkpoint is from before this step")

    def summary(self) -> str:
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - a failed step can leave its outputs unreadable; say what is known
            pass
        total = self.before + len(self.steps) if self.skipped is None else self.skipped
        if not self.steps and not total:
            return "skipped steps: none (every update was finite)"
        listed = ", ".join(map(str, self.steps[:20])) + (", ..." if len(self.steps) > 20 else "")
        of = f" of {self.updates} updates" if self.updates else ""
        return (f"skipped steps: {total}{of} dropped as non-finite (loss, gradient or updated state)"
                + (f"; in this run at steps {listed}" if self.steps else ""))


def _non_finite_message(step: int, m: dict) -> str:
    loss, grad_norm = float(m["loss"]), float(m.get("grad_norm", np.nan))
    what = ("the loss" if not np.isfinite(loss) else "the gradient norm" if not np.isfinite(grad_norm)
            else "the updated parameters or optimizer state")
    return (f"non-finite step {step}: {what} (loss={loss}, grad_norm={grad_norm}); "
            "the update was dropped and nothing was checkpointed for this step")


def _to_floats(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _postfix(row: dict) -> dict[str, str]:
    out = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
    if "tokens_per_sec" in row:
        out["tok/s"] = f"{row['tokens_per_sec']:.0f}"
    return out
