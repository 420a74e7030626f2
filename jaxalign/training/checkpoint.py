"""Orbax checkpoints of the train state plus the data iterator's position, verified on restore.

Each checkpoint step holds two items: `state` (the `TrainState` arrays, saved
sharded, restored onto the shardings of a target) and `data` (JSON: one
iterator state per process, since each process reads its own rows). Steps
are committed atomically by Orbax (written to a temporary directory, then
renamed), so a process killed mid-save leaves the previous step loadable.

Orbax (0.12) checks no array data on restore: a flipped byte in a large
tensor's file restores as a wrong value (OCDBT checksums only its index
nodes). So every save also records, in the step's own metadata
(`_CHECKPOINT_METADATA`, key `jaxalign_integrity`), a 64-bit fingerprint of
each array, computed on the devices (`fingerprints`) and independent of the
sharding, and a SHA-256 of the data item. `restore` recomputes them on what
it read: a mismatch, a missing or unreadable file raises
`CorruptCheckpointError` naming the step and the tensor or file. `resume`
applies the `on_corrupt` policy: "fallback" sets the damaged step aside
(renamed `<step>.corrupt`, kept for inspection) and takes the newest intact
step; "error" raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxalign.training.state import TrainState

logger = logging.getLogger(__name__)

ON_CORRUPT = ("fallback", "error")
_INTEGRITY_KEY = "jaxalign_integrity"
# Small JSON files Orbax writes per step; parsed up front so damage there names the file.
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding", "data/metadata")
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "data/metadata")


def _ocp():
    """orbax.checkpoint, imported on first use: a run that never checkpoints
    (a benchmark, a notebook) does not pay its import time and memory."""
    import orbax.checkpoint as ocp

    return ocp


class NonFiniteError(RuntimeError):
    """Raised instead of writing (or continuing from) non-finite values."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step that cannot be restored exactly; the message names the step and the tensor or file."""


class Resumed(NamedTuple):
    """What `Checkpointer.resume` restored: the step, the state, this process's data
    iterator state (or None), and one line per damaged newer step it set aside."""

    step: int
    state: TrainState
    data_state: Any
    fell_back: tuple[str, ...]


class Checkpointer:
    """Periodic, keep-N, optionally asynchronous checkpoints of a run.

    directory: where step folders go (created if missing).
    save_every: `maybe_save` writes when `step % save_every == 0`.
    keep: how many most recent steps to keep.
    async_save: write in a background thread. Safe with the donated train
      step because Orbax copies the arrays to host memory before `save`
      returns; only the file writing overlaps with the next steps.
    on_corrupt: what `resume` does with a damaged newest step: "fallback"
      (set it aside, restore the newest intact one) or "error" (raise
      `CorruptCheckpointError`).
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True,
                 on_corrupt: str = "fallback"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"checkpoint.on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.save_every = save_every
        self.on_corrupt = on_corrupt
        self.directory = os.path.abspath(directory)
        ocp = _ocp()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=1,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest fully committed step (not checked for damage), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def maybe_save(self, step: int, state: TrainState, data_state: Any = None) -> bool:
        """Saves if `step` is on the interval; returns whether it saved."""
        if step % self.save_every:
            return False
        return self.save(step, state, data_state)

    def save(self, step: int, state: TrainState, data_state: Any = None) -> bool:
        """Saves unconditionally (e.g. the final step), with fingerprints. Refuses non-finite state.

        Returns False (and writes nothing) if `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        tree = state._asdict()
        finite, prints = jax.device_get(fingerprints(tree))
        names = _leaf_names(tree)
        bad = [n for n, ok in zip(names, finite) if not ok]
        if bad:
            raise NonFiniteError(f"refusing to checkpoint step {step}: {bad[0]} has NaN/Inf"
                                 + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
        data = _gather_data_states(data_state)
        integrity = {"arrays": {n: _hex(p) for n, p in zip(names, prints)}, "data_sha256": _json_sha(data)}
        ocp = _ocp()
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data)),
            custom_metadata={_INTEGRITY_KEY: integrity},
            force=True,
        )

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
        """Loads `step` (default: latest) onto the shapes/shardings of `target`, verified.

        target: a `TrainState` of arrays or `jax.ShapeDtypeStruct`s with
          shardings (`abstract_state(state)`).
        Returns (state, this process's data iterator state or None).
        Raises `CorruptCheckpointError` (step and tensor or file named) if a
        file is missing or unreadable or an array differs from what was saved.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        return self._restore_verified(target, step)

    def resume(self, target: TrainState) -> Resumed | None:
        """The newest intact step under the `on_corrupt` policy; None if there is no checkpoint.

        With "fallback", each damaged newer step is renamed `<step>.corrupt`
        (so a later save of that step number, or the next resume, does not
        meet it again) and listed in `Resumed.fell_back`. Raises
        `CorruptCheckpointError` with "error", or when no step is intact.
        """
        reasons: list[str] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data = self._restore_verified(target, step)
                return Resumed(step, state, data, tuple(reasons))
            except CorruptCheckpointError as e:
                if self.on_corrupt == "error":
                    raise
                reasons.append(f"{e}; set aside as {self._set_aside(step)}")
                logger.info(reasons[-1])  # `train` prints the one visible line
        if reasons:
            raise CorruptCheckpointError(f"no intact checkpoint in {self.directory}: " + " | ".join(reasons))
        return None

    def wait(self) -> None:
        """Blocks until background writes are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _restore_verified(self, target: TrainState, step: int) -> tuple[TrainState, Any]:
        step_dir = os.path.join(self.directory, str(step))
        where = f"checkpoint step {step} ({step_dir})"
        ok, failure = True, None
        try:
            integrity = _check_files(step_dir, where)
            state, data = self._read(target, step, where)
            _verify(state._asdict(), data, integrity, where)
        except CorruptCheckpointError as e:
            ok, failure = False, e
        if jax.process_count() > 1:
            # Each process reads its own shards: all of them must agree the step is intact.
            ok_all = bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
            if ok and not ok_all:
                failure = CorruptCheckpointError(f"{where}: another process could not read it")
            ok = ok_all
        if not ok:
            raise failure
        return state, data.get(f"process_{jax.process_index()}")

    def _read(self, target: TrainState, step: int, where: str) -> tuple[TrainState, dict]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        ocp = _ocp()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract._asdict()), data=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax and TensorStore raise many types; all mean "cannot read this step"
            _mute_closed_loop_callbacks()
            raise CorruptCheckpointError(f"{where}: {_describe_read_error(e)}") from e
        return TrainState(**out["state"]), out["data"] or {}

    def _set_aside(self, step: int) -> str:
        """Renames a damaged step folder out of Orbax's sight (`<step>.corrupt[-k]`); returns the new path."""
        src = os.path.join(self.directory, str(step))
        dst, k = f"{src}.corrupt", 1
        while os.path.exists(dst):
            dst, k = f"{src}.corrupt-{k}", k + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxalign_set_aside_{step}")
        self._manager.reload()
        return dst


@jax.jit
def fingerprints(tree: Any) -> tuple[jax.Array, jax.Array]:
    """Per-leaf (finite: bool [n], fingerprint: uint32 [n, 2]) of a pytree of arrays.

    Each leaf's bits, read as unsigned integers u_i (i its row-major flat
    index), give two sums mod 2^32: Σ u_i·(2i+1) and Σ mix(u_i + i·φ), with
    φ = 0x9E3779B9 and `mix` a murmur3-style finaliser. Integer sums are
    exact in any order, so the fingerprint does not depend on the sharding or
    the number of devices; a changed element changes the first sum (odd
    weights) and, through `mix`, the second. Non-float leaves count as finite.
    """
    leaves = jax.tree.leaves(tree)
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
              for x in leaves]
    prints = [_fingerprint(x) for x in leaves]
    if not leaves:
        return jnp.zeros((0,), bool), jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack(finite), jnp.stack(prints)


def _fingerprint(x: jax.Array) -> jax.Array:
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = (x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, bits)).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        stride *= x.shape[d]
    h = u + index * jnp.uint32(0x9E3779B9)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.stack([jnp.sum(u * (2 * index + 1), dtype=jnp.uint32), jnp.sum(h, dtype=jnp.uint32)])


def _leaf_names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _hex(pair) -> str:
    return "".join(f"{int(v):08x}" for v in np.asarray(pair).reshape(-1))


def _json_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _check_files(step_dir: str, where: str) -> dict | None:
    """Every required file present and every small JSON file parseable; returns the integrity record
    (None for a checkpoint written before jaxalign recorded one)."""
    for rel in _REQUIRED:
        if not os.path.isfile(os.path.join(step_dir, rel)):
            raise CorruptCheckpointError(f"{where}: file {rel} is missing")
    parsed = {}
    listed = sorted(os.path.relpath(os.path.join(d, f), step_dir)
                    for d, _, files in os.walk(os.path.join(step_dir, "state", "array_metadatas")) for f in files)
    for rel in (*_JSON_FILES, *listed):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                parsed[rel] = json.loads(f.read())
        except (ValueError, OSError) as e:
            raise CorruptCheckpointError(f"{where}: file {rel} is unreadable ({e})") from e
    meta = parsed["_CHECKPOINT_METADATA"]
    integrity = (meta.get("custom_metadata") or {}).get(_INTEGRITY_KEY) if isinstance(meta, dict) else None
    if integrity is None:
        logger.warning("%s has no fingerprints (written before jaxalign recorded them): not verified", where)
    return integrity


def _verify(tree: dict, data: dict, integrity: dict | None, where: str) -> None:
    if integrity is None:
        return
    expected = integrity.get("arrays", {})
    names = _leaf_names(tree)
    _, prints = jax.device_get(fingerprints(tree))
    for name, p in zip(names, prints):
        if name not in expected:
            raise CorruptCheckpointError(f"{where}: tensor {name} has no recorded fingerprint")
        if _hex(p) != expected[name]:
            raise CorruptCheckpointError(f"{where}: tensor {name} differs from what was saved (fingerprint mismatch)")
    if _json_sha(data) != integrity.get("data_sha256"):
        raise CorruptCheckpointError(f"{where}: file data/metadata differs from what was saved (SHA-256 mismatch)")


def _mute_closed_loop_callbacks() -> None:
    """After a failed read, Orbax has closed its event loop while TensorStore reads of the same
    restore are still in flight; each one that completes then reports "Event loop is closed"
    through `sys.unraisablehook` (dozens of tracebacks on the console). Those, and only those, are
    dropped from now on; every other unraisable exception goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxalign_mutes_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxalign_mutes_closed_loop = True
    sys.unraisablehook = hook


def _describe_read_error(e: Exception) -> str:
    """A one-line reason naming the tensor (and file) that TensorStore reports, from the innermost error."""
    chain = []
    while e is not None and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in reversed(chain):  # the innermost TensorStore error says what failed
        text = str(err).split(" [tensorstore_spec", 1)[0]
        tensor = re.search(r'Error reading "([^"/]+)', text)
        if tensor:
            code = re.match(r"([A-Z_]+):", text)
            detail = text.rsplit(": ", 1)[-1].splitlines()[0][:160]
            files = re.findall(r'local file "([^"]+)"', text)
            where = f" in {files[-1]}" if files else ""
            return (f"cannot read tensor {tensor.group(1).replace('.', '/')}{where} "
                    f"({code.group(1) if code else type(err).__name__}: {detail})")
    text = str(chain[-1]).splitlines()[0] if str(chain[-1]) else ""
    return f"cannot read it ({type(chain[-1]).__name__}: {text[:200]})"


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
