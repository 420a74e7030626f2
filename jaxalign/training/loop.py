"""The generic training loop: steps, logging, evaluation, checkpoints, plots."""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

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
) -> tuple[TrainState, list[dict]]:
    """Runs `step_fn` until `state.step == num_steps`; returns (state, rows).

    data: iterator of host batches (this process's rows). If it has
      `get_state()`/`set_state(dict)`, its position is checkpointed with the
      state and restored on resume.
    checkpointer: if it holds a checkpoint, the run resumes from the latest
      one (state, rng, optimizer, data position); it saves on its interval
      and at the end.
    eval_fn(state, step) -> metrics: run every `eval_every` steps (0: only at
      the end), logged as `eval/<name>`.
    log_every: train metrics (loss, grad_norm, lr, …, tokens_per_sec) are
      fetched, written and shown every this many steps and at the last step.
    workdir: where `metrics.jsonl`, `tensorboard/` and `plots/*.png` go
      (process 0 only); None writes no files.
    Raises NonFiniteError at the first non-finite step if the step was built
    with `nan_policy="stop"`, before that step could be checkpointed.
    Returns the rows logged by this call (process 0; empty elsewhere).
    """
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        # The checkpoint's step is the loop's; `state.step` counts optimiser
        # updates, which differ when a step function updates several times
        # per call (PPO epochs, GRPO's mu).
        start = int(checkpointer.latest_step())
        if data_state is not None and hasattr(data, "set_state"):
            data.set_state(data_state)
        elif hasattr(data, "set_state"):
            logger.warning("checkpoint has no data state: data restarts from its current position")
        logger.info("resumed from step %d", start)

    lead = jax.process_index() == 0
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
            if step_fn.nan_policy == "stop" and not bool(metrics["finite"]):
                m = jax.device_get(metrics)
                raise NonFiniteError(
                    f"non-finite step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}; "
                    "the update was dropped and nothing was checkpointed for this step"
                )
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
            if checkpointer is not None:
                t_save = time.perf_counter()
                data_state = data.get_state() if hasattr(data, "get_state") else None
                if step == num_steps:
                    checkpointer.save(step, state, data_state)
                else:
                    checkpointer.maybe_save(step, state, data_state)
                t0 += time.perf_counter() - t_save
            bar.update(1)
    finally:
        bar.close()
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


def _to_floats(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _postfix(row: dict) -> dict[str, str]:
    out = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
    if "tokens_per_sec" in row:
        out["tok/s"] = f"{row['tokens_per_sec']:.0f}"
    return out
