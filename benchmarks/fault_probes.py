"""The probes of issue 33, run against a source tree: what a user meets when a checkpoint is damaged,
an update overflows, a model path is not local, and how many log lines a run prints.

    python benchmarks/fault_probes.py                        # this tree
    git archive 077b83d | tar -x -C /tmp/old && python benchmarks/fault_probes.py --root /tmp/old

Each probe runs in a fresh process with the tree at `--root` first on the path
and prints one line per finding (the "before" column of docs/training.md's
fault table came from the second command, the "after" from the first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKPOINT = r'''
import glob, os, shutil, numpy as np, jax, jax.numpy as jnp
from jaxalign.training import Checkpointer, TrainState
def state(v):
    r = np.random.default_rng(v)
    p = {"w": jnp.asarray(r.standard_normal((256, 256), np.float32)), "b": jnp.asarray(r.standard_normal((64,), np.float32))}
    return TrainState(params=p, opt_state={"mu": jax.tree.map(lambda x: x * 0.5, p)}, step=jnp.int32(v),
                      rng=jax.random.PRNGKey(v), skipped_steps=jnp.int32(0))
def biggest(d):
    return max((os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs), key=os.path.getsize)
def xor(p):
    b = bytearray(open(p, "rb").read()); m = len(b) // 2
    b[m:m + 64] = bytes(x ^ 0xFF for x in b[m:m + 64]); open(p, "wb").write(bytes(b))
def trunc(p):
    b = open(p, "rb").read(); open(p, "wb").write(b[: len(b) // 2])
ref = os.path.join(WORK, "ref"); ck = Checkpointer(ref, save_every=1)
for v in (1, 2): ck.save(v, state(v), {"position": v})
ck.close()
cases = {"xor 64 bytes in the largest data file": lambda s: xor(biggest(s + "/state")),
         "largest data file cut in half": lambda s: trunc(biggest(s + "/state")),
         "state/_METADATA cut in half": lambda s: trunc(s + "/state/_METADATA"),
         "data/metadata cut in half": lambda s: trunc(s + "/data/metadata")}
for name, damage in cases.items():
    d = os.path.join(WORK, name.replace(" ", "_").replace("/", "_")); shutil.copytree(ref, d); damage(d + "/2")
    ck = Checkpointer(d, save_every=1)
    try:
        st, _ = ck.restore(state(0))
        same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), state(2), st)))
        line = f"restore() of step 2 returned without complaint; equal to what was saved: {same}"
    except Exception as e:
        line = f"restore() of step 2 raised {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if hasattr(ck, "resume"):
        try:
            r = ck.resume(state(0)); line += f" | resume() -> step {r.step}"
        except Exception as e:
            line += f" | resume() raised {type(e).__name__}"
    ck.close()
    print(f"checkpoint, {name}: {line}")
'''

GUARD = r'''
import inspect, io, contextlib, numpy as np, jax, optax
from flax import nnx
from tests._toy_model import ToyData, ToyLM, token_mean_loss
from jaxalign.training import init_train_state, make_train_step, state_shardings, train, Checkpointer, NonFiniteError
tx = optax.chain(optax.scale_by_adam(), optax.scale(-1e38), optax.scale(10.0))  # lr -1e39 as two finite factors
def fresh():
    return init_train_state(ToyLM(rngs=nnx.Rngs(0)), tx, seed=0)
state, md = fresh()
step = make_train_step(token_mean_loss, tx, model_def=md, shardings=state_shardings(state))
s, m = step(state, next(ToyData(seed=1)))
finite = all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(jax.device_get(s.params)))
print(f"guard, lr 1e39: loss finite {bool(np.isfinite(float(m['loss'])))}, grad_norm finite "
      f"{bool(np.isfinite(float(m['grad_norm'])))}, step counted finite {bool(m['finite'])}, kept params finite {finite}")
kw = {"max_skipped_fraction": 0.5} if "max_skipped_fraction" in inspect.signature(train).parameters else {}
ck = Checkpointer(WORK + "/ckpt", save_every=5, async_save=False)
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        train(step, fresh()[0], ToyData(seed=1), num_steps=10, checkpointer=ck, console=False, progress=False, **kw)
    result = "ended normally (rc 0)"
except Exception as e:
    result = f"raised {type(e).__name__}: {str(e)[:160]}"
ck.close()
summary = [l for l in out.getvalue().splitlines() if "skipped" in l]
print(f"guard, 10 steps that all overflow (skip{', max_skipped_fraction 0.5' if kw else ''}): {result}; "
      f"summary printed: {summary[0] if summary else 'none'}")
'''

DATA = r'''
import io, contextlib, os
from jaxalign import data
good, bad = WORK + "/good.jsonl", WORK + "/bad.jsonl"
open(good, "w").write('{"prompt": "a", "completion": "b"}\n')
open(bad, "w").write('{"prompt": "a", "completion": ""}\n')
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    data.prepare("sft", good, data_dir=WORK + "/tfds")
    try:
        data.prepare("sft", bad, data_dir=WORK + "/tfds")
    except Exception:
        pass
left = sorted(n for n in os.listdir(WORK + "/tfds/jaxalign_sft") if n.startswith("bad"))
print(f"data: 'Downloading' lines printed for local JSONL: {out.getvalue().count('Downloading')}; "
      f"folders left by a failed build: {left}")
'''


def run_snippet(root: str, code: str, work: str) -> str:
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAXALIGN_COMPILE_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", f"WORK = {work!r}\n" + code], cwd=root, env=env,
                         capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith(("checkpoint", "guard", "data"))]
    return "\n".join(lines) or f"(probe failed: {out.stderr.strip().splitlines()[-1:]})"


def entry(root: str, args: list[str], env_extra: dict | None = None) -> tuple[float, int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "JAXALIGN_COMPILE_CACHE": "0",
           **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(root, "experiments", "train.py"), *args], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t, out.returncode, out.stdout + out.stderr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default=HERE, help="the source tree to probe")
    p.add_argument("--skip-entry", action="store_true", help="leave out the entry-script probes (slow)")
    a = p.parse_args()
    root = os.path.abspath(a.root)
    work = tempfile.mkdtemp(prefix="jaxalign_probe_")
    try:
        for name, code in (("ckpt", CHECKPOINT), ("guard", GUARD), ("data", DATA)):
            os.makedirs(os.path.join(work, name))
            print(run_snippet(root, code, os.path.join(work, name)), flush=True)
        if a.skip_entry:
            return
        config = os.path.join(root, "experiments", "configs", "sft_jsonl.py")
        for path in ("someorg/somemodel", "/data/does_not_exist"):
            dt, rc, text = entry(root, [f"--config={config}", f"--config.model.path={path}"])
            last = [l for l in text.strip().splitlines() if l.strip()][-1][:200]
            print(f"path {path}: rc {rc} after {dt:.1f} s: {last}")
        sys.path.insert(0, HERE)
        from tests._tokenizers import make_char_tokenizer

        tok = os.path.join(work, "tok")
        make_char_tokenizer(tok)
        rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(64)]
        with open(os.path.join(work, "sft.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        common = [f"--config={config}", f"--config.model.tokenizer={tok}", f"--config.data.train={work}/sft.jsonl",
                  f"--config.data.data_dir={work}/tfds_entry", f"--config.workdir={work}/run",
                  "--config.checkpoint.every=5", "--config.train.log_every=10", "--config.train.eval_every=0",
                  "--config.optim.total_steps=300"]
        for steps in (300, 320):
            dt, rc, text = entry(root, common + [f"--config.train.steps={steps}"])
            lines = text.splitlines()
            absl_info = sum(bool(re.match(r"I\d{4} ", l)) for l in lines)
            resumed = [l for l in lines if "resumed from step" in l or "fell back" in l]
            print(f"logs, {steps}-step SFT run (checkpoints every 5; {'a resume' if steps == 320 else 'fresh'}): "
                  f"rc {rc}, {len(lines)} output lines, {absl_info} absl INFO lines, "
                  f"{sum('Downloading' in l for l in lines)} 'Downloading' lines, resume line: "
                  f"{resumed[0].strip()[:80] if resumed else 'none'}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
