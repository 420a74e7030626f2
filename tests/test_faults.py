"""Faults a run must survive or refuse clearly: damaged checkpoints, updates that overflow the state."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests._toy_model import ToyData, ToyLM, token_mean_loss
from jaxalign.training import (
    Checkpointer,
    CorruptCheckpointError,
    NonFiniteError,
    TrainState,
    init_train_state,
    make_train_step,
    state_shardings,
    train,
)


def _state(seed: int) -> TrainState:
    """A state with arrays big enough (256 KiB) that OCDBT stores them out of line, unchecked by Orbax."""
    r = np.random.default_rng(seed)
    params = {"w": jnp.asarray(r.standard_normal((256, 256), np.float32)),
              "b": jnp.asarray(r.standard_normal((64,), np.float32))}
    return TrainState(params=params, opt_state={"mu": jax.tree.map(lambda x: x * 0.5, params)},
                      step=jnp.int32(seed), rng=jax.random.PRNGKey(seed), skipped_steps=jnp.int32(0))


def _xor_middle(path: str, n: int = 64) -> None:
    b = bytearray(open(path, "rb").read())
    m = len(b) // 2
    for i in range(m, min(m + n, len(b))):
        b[i] ^= 0xFF
    open(path, "wb").write(bytes(b))


def _truncate(path: str) -> None:
    b = open(path, "rb").read()
    open(path, "wb").write(b[: len(b) // 2])


def _largest_file(d: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


def _retamper_fingerprint(step_dir: str) -> None:
    """Rewrites the recorded fingerprint of params/w, as if that tensor's bytes had changed."""
    path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    meta = json.load(open(path))
    meta["custom_metadata"]["jaxalign_integrity"]["arrays"]["params/w"] = "0" * 16
    json.dump(meta, open(path, "w"))


DAMAGE = {
    # The largest file holds both 256x256 tensors; which one the damage hits depends on Orbax's layout.
    "xor64_in_largest_data_file": (lambda d: _xor_middle(_largest_file(os.path.join(d, "state"))),
                                   "tensor (params|opt_state/mu)/w"),
    "half_truncated_largest_data_file": (lambda d: _truncate(_largest_file(os.path.join(d, "state"))),
                                         "tensor (params|opt_state/mu)/w"),
    "truncated_state_METADATA": (lambda d: _truncate(os.path.join(d, "state", "_METADATA")), "file state/_METADATA"),
    "truncated_data_metadata": (lambda d: _truncate(os.path.join(d, "data", "metadata")), "file data/metadata"),
    "missing_state_METADATA": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), "file state/_METADATA"),
    "tensor_differs_from_its_fingerprint": (_retamper_fingerprint, "tensor params/w differs"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of steps 1 and 2, written once; each test damages a copy."""
    d = str(tmp_path_factory.mktemp("ckpt") / "ref")
    ck = Checkpointer(d, save_every=1, async_save=False)
    for s in (1, 2):
        ck.save(s, _state(s), {"position": s})
    ck.close()
    return d


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


# Orbax leaves its aborted read coroutines to the garbage collector after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_and_falls_back(saved, tmp_path, damage):
    corrupt, named = DAMAGE[damage]
    d = str(tmp_path / "ckpt")
    shutil.copytree(saved, d)
    corrupt(os.path.join(d, "2"))
    ck = Checkpointer(d, save_every=1, on_corrupt="error")
    try:
        with pytest.raises(CorruptCheckpointError, match=r"checkpoint step 2 .*" + named):
            ck.restore(_state(0))
        with pytest.raises(CorruptCheckpointError, match="checkpoint step 2"):
            ck.resume(_state(0))  # policy "error": nothing is moved
        assert ck.all_steps() == [1, 2]
    finally:
        ck.close()
    ck = Checkpointer(d, save_every=1)  # default policy: fallback
    try:
        step, state, data, fell_back = ck.resume(_state(0))
        assert step == 1 and data == {"position": 1} and _same(state, _state(1))
        assert len(fell_back) == 1 and re.search("checkpoint step 2 .*" + named, fell_back[0])
        assert ck.all_steps() == [1] and os.path.isdir(os.path.join(d, "2.corrupt"))
        ck.save(2, _state(2), {"position": 2})  # the step number is free again
        ck.wait()
        assert _same(ck.restore(_state(0))[0], _state(2))
    finally:
        ck.close()


def test_intact_checkpoint_restores_exactly(saved):
    ck = Checkpointer(saved, save_every=1)
    try:
        resumed = ck.resume(_state(0))
        assert resumed.step == 2 and resumed.fell_back == () and _same(resumed.state, _state(2))
    finally:
        ck.close()


# --- the NaN guard on the kept state --------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing_step():
    """A step whose loss and gradient are finite but whose update overflows float32 (lr -1e39)."""
    # Adam's direction (|u| <= ~1) times 1e39, as two finite factors: the optimizer state holds no Inf.
    tx = optax.chain(optax.scale_by_adam(), optax.scale(-1e38), optax.scale(10.0))

    def fresh():
        return init_train_state(ToyLM(rngs=nnx.Rngs(0)), tx, seed=0)

    state, model_def = fresh()
    step = make_train_step(token_mean_loss, tx, model_def=model_def, shardings=state_shardings(state))
    return step, lambda: fresh()[0]


def test_guard_checks_the_state_it_keeps(overflowing_step):
    step, fresh = overflowing_step
    state = fresh()
    before = jax.device_get(state)
    state, m = step(state, next(ToyData(seed=1)))
    after = jax.device_get(state)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))  # the old guard saw nothing
    assert not bool(m["finite"]) and int(after.skipped_steps) == 1 and int(after.step) == 1
    assert _same((before.params, before.opt_state), (after.params, after.opt_state))  # `skip` kept the old state


def test_skipping_run_keeps_finite_checkpoints_and_prints_a_summary(overflowing_step, tmp_path, capsys):
    step, fresh = overflowing_step
    ck = Checkpointer(str(tmp_path / "ckpt"), save_every=2, async_save=False)
    try:
        state, _ = train(step, fresh(), ToyData(seed=1), num_steps=4, checkpointer=ck, console=False,
                         progress=False)
        restored, _ = ck.restore(fresh())
    finally:
        ck.close()
    out = capsys.readouterr().out
    assert "skipped steps: 4 of 4 updates dropped as non-finite" in out and "at steps 1, 2, 3, 4" in out
    assert "saved checkpoint step 2" in out and "saved checkpoint step 4" in out
    assert _same(restored.params, fresh().params)  # every update dropped: the initial, finite weights


def test_max_skipped_fraction_stops_the_run_before_its_checkpoint(overflowing_step, tmp_path, capsys):
    step, fresh = overflowing_step
    ck = Checkpointer(str(tmp_path / "ckpt"), save_every=3, async_save=False)
    try:
        with pytest.raises(NonFiniteError, match=r"stopping at step 2: 2 of 2 updates .*max_skipped_fraction=0.5"):
            train(step, fresh(), ToyData(seed=1), num_steps=10, checkpointer=ck, console=False, progress=False,
                  log_every=1, max_skipped_fraction=0.5)
        assert ck.all_steps() == []
    finally:
        ck.close()
    assert "skipped steps: 2 of 2 updates" in capsys.readouterr().out  # the summary also ends a failed run
