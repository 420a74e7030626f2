"""The loop: metric files, NaN stop before checkpoint, exact resume after kill -9."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.training import Checkpointer, NonFiniteError
from jaxalign.training.metrics import JsonlWriter, TensorBoardWriter, read_jsonl
from tests._train_worker import build, run, soak

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("loss", "grad_norm", "lr", "finite", "skipped_steps", "token_nll", "eval/loss")


def read_tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from event files, parsed with tensorboardX's protos.

    Event files are TFRecords: u64 length, u32 crc, payload, u32 crc. Files are
    read in the order they were opened; a session-restart marker at step s
    hides what earlier files logged at steps >= s, as TensorBoard does.
    """
    from tensorboardX.proto import event_pb2

    files = []
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        data, i, events = open(path, "rb").read(), 0, []
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
            i += 12 + n + 4
        files.append(events)
    out: dict = {}
    for events in sorted(files, key=lambda ev: ev[0].wall_time):
        for event in events:
            if event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: {s: v for s, v in by_step.items() if s < event.step} for tag, by_step in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metric_outputs(tmp_path):
    wd = str(tmp_path)
    _, rows = run(wd, 6, log_every=2, eval_every=3)
    file_rows = read_rows(wd)
    assert [r["step"] for r in file_rows] == [2, 3, 4, 6]  # one row per logged step
    assert file_rows == json.loads(json.dumps(rows))
    assert {"loss", "grad_norm", "lr", "steps_per_sec", "tokens_per_sec"} <= set(file_rows[2])
    assert set(file_rows[1]) == {"step", "eval/loss"}
    assert "eval/loss" in file_rows[3]

    tb = read_tensorboard_scalars(os.path.join(wd, "tensorboard"))
    assert sorted(tb["loss"]) == [2, 4, 6] and sorted(tb["eval/loss"]) == [3, 6]
    for step, value in tb["loss"].items():
        row = next(r for r in file_rows if r["step"] == step)
        assert value == pytest.approx(row["loss"], rel=1e-6)

    for name in ("loss", "lr", "grad_norm", "eval_loss"):
        path = os.path.join(wd, "plots", f"{name}.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        assert os.path.getsize(path) > 2000


def test_nan_stop_raises_before_checkpoint(tmp_path):
    wd = str(tmp_path)
    # Batch index 3 is poisoned, i.e. step 4; checkpoints every step.
    with pytest.raises(NonFiniteError, match="non-finite step 4"):
        run(wd, 8, ckpt_every=1, poison_at=(3,), nan_policy="stop")
    ckpt = Checkpointer(os.path.join(wd, "ckpt"), save_every=1)
    try:
        assert ckpt.latest_step() == 3 and 4 not in ckpt.all_steps()
        _, fresh_state, _ = build("8", "stop")
        state, data_state = ckpt.restore(fresh_state())
        assert int(state.step) == 3 and data_state["position"] == 3
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
    finally:
        ckpt.close()


def test_checkpointer_refuses_non_finite_state(tmp_path):
    _, fresh_state, _ = build("8")
    state = fresh_state()
    bad = state._replace(params={**state.params, "scale": state.params["scale"] * jnp.nan})
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, async_save=False)
    try:
        with pytest.raises(NonFiniteError):
            ckpt.save(1, bad, {"position": 1})
        assert ckpt.latest_step() is None
    finally:
        ckpt.close()


def test_resume_after_kill9_is_exact(tmp_path):
    steps, every = 12, 3
    ref_dir, killed_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(REPO, "tests", "_train_worker.py"), "--workdir", killed_dir,
           "--steps", str(steps), "--ckpt-every", str(every), "--sleep", "0.4", "--eval-every", "4",
           "--hang-at", "7"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # The uninterrupted reference run, while the worker starts up.
        run(ref_dir, steps, ckpt_every=every, eval_every=4)
        ref_rows = {r["step"]: r for r in read_rows(ref_dir)}
        deadline = time.time() + 120
        metrics = os.path.join(killed_dir, "metrics.jsonl")
        # Kill between checkpoints: after step 7 is logged (checkpoint 6 is
        # committed or in flight, checkpoint 9 not yet started). The worker
        # waits before batch 8, so the kill lands there however late it comes.
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and any(r["step"] >= 7 for r in read_jsonl(metrics)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    logged_before_kill = max(r["step"] for r in read_jsonl(metrics))
    assert logged_before_kill == 7

    ckpt = Checkpointer(os.path.join(killed_dir, "ckpt"), save_every=every)
    try:
        last = ckpt.latest_step()
        assert last in (3, 6)  # the last complete checkpoint
        state, data_state = ckpt.restore(build("8")[1]())
        assert int(state.step) == last and data_state["position"] == last
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
    finally:
        ckpt.close()

    run(killed_dir, steps, ckpt_every=every, eval_every=4)  # resumes from `last`
    rows = read_rows(killed_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no duplicates, no gaps
    for r in rows:
        for k in COMPARED:
            assert (k in r) == (k in ref_rows[r["step"]]), (r["step"], k)
            if k in r:
                assert r[k] == ref_rows[r["step"]][k], (r["step"], k)  # bit-exact
    tb = read_tensorboard_scalars(os.path.join(killed_dir, "tensorboard"))
    assert sorted(tb["loss"]) == list(range(1, steps + 1))
    for r in rows:  # float32 in the event file
        assert tb["loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6), r["step"]


def _final_state(workdir: str, every: int):
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), save_every=every)
    try:
        return jax.device_get(ckpt.restore(build("8")[1]())[0])
    finally:
        ckpt.close()


def test_soak_kill9_in_steps_and_saves_and_a_corrupted_checkpoint_end_bit_identical(tmp_path):
    """Killed twice (during a save, then during a step), the newest checkpoint damaged before the
    last resume: the run falls back and ends as the uninterrupted one did.
    benchmarks/soak.py runs the same with many more kills and corruptions."""
    steps, every = 12, 2
    ref_dir, soak_dir = str(tmp_path / "ref"), str(tmp_path / "soak")
    run(ref_dir, steps, ckpt_every=every)
    result = soak(soak_dir, steps, every=every, kills=2, corruptions=1, seed=0)
    assert result["kills"] == 2 and result["corruptions"] == 1, result
    assert result["fell_back"] == 1, result  # the damaged step was detected, set aside, and the older one used
    assert len(result["resume_lines"]) == 2, result  # one visible line per resume
    ref_rows = {r["step"]: r for r in read_rows(ref_dir)}
    rows = read_rows(soak_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for k in COMPARED:
            assert (k in r) == (k in ref_rows[r["step"]]) and r.get(k) == ref_rows[r["step"]].get(k), (r["step"], k)
    same = jax.tree.map(np.array_equal, _final_state(ref_dir, every), _final_state(soak_dir, every))
    assert all(jax.tree.leaves(same))


def test_tensorboard_steps_are_on_disk_when_write_returns(tmp_path):
    """A killed run keeps every step it logged; a resume hides the steps after its checkpoint."""
    logdir = str(tmp_path)
    first = TensorBoardWriter(logdir)
    for step in range(1, 6):
        first.write(step, {"loss": float(step), "lr": 0.5})
        # Read before close, as after a kill -9.
        assert read_tensorboard_scalars(logdir)["loss"] == {s: float(s) for s in range(1, step + 1)}
    # Resumed from the checkpoint at step 3, within the same second; `first` is never closed.
    second = TensorBoardWriter(logdir, resume_step=3)
    assert read_tensorboard_scalars(logdir)["loss"] == {1: 1.0, 2: 2.0, 3: 3.0}
    second.write(4, {"loss": 40.0})
    assert read_tensorboard_scalars(logdir) == {"loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0},
                                                "lr": {1: 0.5, 2: 0.5, 3: 0.5}}
    second.close()
    first.close()
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 2


def test_jsonl_resume_that_fails_midway_keeps_every_row(tmp_path, monkeypatch):
    """Dropping the rows after the checkpoint rewrites the file; a failure there must not truncate it."""
    from jaxalign.training import metrics

    path = str(tmp_path / "metrics.jsonl")
    w = JsonlWriter(path)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.close()
    calls = {"n": 0}
    real_dumps = metrics.json.dumps

    def dumps_then_fail(obj, *a, **k):  # as if the process died after the first rewritten row
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real_dumps(obj, *a, **k)

    monkeypatch.setattr(metrics.json, "dumps", dumps_then_fail)
    with pytest.raises(KeyboardInterrupt):
        JsonlWriter(path, resume_step=3)
    monkeypatch.undo()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left
    JsonlWriter(path, resume_step=3).close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_final_state_matches_numpy_checkpoint(tmp_path):
    """Restoring the final checkpoint gives back exactly the returned state."""
    state, _ = run(str(tmp_path), 4, ckpt_every=2, log_every=4)
    expected = jax.device_get(state)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=2)
    try:
        assert ckpt.all_steps() == [2, 4]
        restored, _ = ckpt.restore(build("8")[1]())
        same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), expected, restored)
        assert all(jax.tree.leaves(same))
        assert restored.params["w_in"].sharding == state.params["w_in"].sharding
    finally:
        ckpt.close()
