"""Orbax checkpoints of the train state plus the data iterator's position.

Each checkpoint step holds two items: `state` (the `TrainState` arrays, saved
sharded, restored onto the shardings of a target) and `data` (JSON: one
iterator state per process, since each process reads its own rows). Steps
are committed atomically by Orbax (written to a temporary directory, then
renamed), so a process killed mid-save leaves the previous step loadable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxalign.training.state import TrainState


def _ocp():
    """orbax.checkpoint, imported on first use: a run that never checkpoints
    (a benchmark, a notebook) does not pay its import time and memory."""
    import orbax.checkpoint as ocp

    return ocp


class NonFiniteError(RuntimeError):
    """Raised instead of writing (or continuing from) non-finite values."""


class Checkpointer:
    """Periodic, keep-N, optionally asynchronous checkpoints of a run.

    directory: where step folders go (created if missing).
    save_every: `maybe_save` writes when `step % save_every == 0`.
    keep: how many most recent steps to keep.
    async_save: write in a background thread. Safe with the donated train
      step because Orbax copies the arrays to host memory before `save`
      returns; only the file writing overlaps with the next steps.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.save_every = save_every
        ocp = _ocp()
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=1,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest fully committed step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def maybe_save(self, step: int, state: TrainState, data_state: Any = None) -> bool:
        """Saves if `step` is on the interval; returns whether it saved."""
        if step % self.save_every:
            return False
        return self.save(step, state, data_state)

    def save(self, step: int, state: TrainState, data_state: Any = None) -> bool:
        """Saves unconditionally (e.g. the final step). Refuses non-finite state."""
        if step in self._manager.all_steps():
            return False
        if not bool(_all_finite((state.params, state.opt_state))):
            raise NonFiniteError(f"refusing to checkpoint step {step}: state has NaN/Inf")
        ocp = _ocp()
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state._asdict()),
                data=ocp.args.JsonSave(_gather_data_states(data_state)),
            ),
            force=True,
        )

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
        """Loads `step` (default: latest) onto the shapes/shardings of `target`.

        target: a `TrainState` of arrays or `jax.ShapeDtypeStruct`s with
          shardings (`abstract_state(state)`).
        Returns (state, this process's data iterator state or None).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        ocp = _ocp()
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract._asdict()),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = TrainState(**out["state"])
        data = out["data"] or {}
        return state, data.get(f"process_{jax.process_index()}")

    def wait(self) -> None:
        """Blocks until background writes are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _json_default(x: Any) -> Any:
    # Iterator states often hold NumPy scalars or small arrays.
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"data iterator state is not JSON-serializable: {type(x).__name__}")


def _gather_data_states(data_state: Any) -> dict:
    """{"process_<i>": state_i} for every process (JSON exchanged as bytes)."""
    text = json.dumps(data_state, default=_json_default)
    if jax.process_count() == 1:
        return {"process_0": json.loads(text)}
    raw = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(raw.size))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    return {
        f"process_{i}": json.loads(bytes(everyone[i, : int(n)]).decode())
        for i, n in enumerate(np.asarray(lengths).reshape(-1))
    }
