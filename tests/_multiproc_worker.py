"""One process of a 2-process x 4-CPU-device training run (gloo collectives).

`python tests/_multiproc_worker.py OUT_JSON CKPT_DIR STEPS` with
JAXALIGN_COORDINATOR / JAXALIGN_NUM_PROCESSES / JAXALIGN_PROCESS_ID set.
Trains the toy model on the global (data 2, fsdp 2, tensor 2) mesh, each
process feeding only its own rows, then checkpoints and restores once.
Process 0 writes the per-step metrics and the checks to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

# Four devices per process, whatever the parent test session used.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxalign import sharding as shd  # noqa: E402

assert shd.maybe_initialize_distributed()

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from _toy_model import ToyData, ToyLM, token_mean_loss  # noqa: E402
from _train_worker import OPTIM  # noqa: E402
from jaxalign.training import (  # noqa: E402
    Checkpointer,
    init_train_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)


def main(out_path: str, ckpt_dir: str, steps: int) -> None:
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    tx = make_optimizer(OPTIM)
    state, model_def = init_train_state(ToyLM(rngs=nnx.Rngs(0)), tx, mesh=mesh, seed=0)
    step = make_train_step(token_mean_loss, tx, model_def=model_def, shardings=state_shardings(state))

    data = ToyData(seed=1)
    rows = shd.process_batch_slice(8, mesh)
    metrics_out = []
    for _ in range(steps):
        batch = next(data)
        local = {k: (v[rows] if np.ndim(v) else v) for k, v in batch.items()}
        state, metrics = step(state, local)
        metrics_out.append({k: float(v) for k, v in jax.device_get(metrics).items()})

    # Checkpoint with per-process data states, then restore onto the shardings.
    ckpt = Checkpointer(ckpt_dir, save_every=1, async_save=True)
    expected = {k: np.asarray(v.addressable_data(0)) for k, v in state.params.items()}
    ckpt.save(steps, state, {"position": data.position, "process": jax.process_index()})
    ckpt.wait()
    restored, data_state = ckpt.restore(state)
    ckpt.close()
    checks = {
        "rows": [rows.start, rows.stop],
        "data_state_is_own": data_state == {"position": steps, "process": jax.process_index()},
        "params_equal": all(
            np.array_equal(expected[k], np.asarray(restored.params[k].addressable_data(0)))
            for k in expected
        ),
        "shardings_equal": state_shardings(restored) == state_shardings(state),
    }
    all_checks = [bool(v) for k, v in checks.items() if k != "rows"]
    # Every process must pass its own checks; gather them to process 0.
    from jax.experimental import multihost_utils

    everyone = multihost_utils.process_allgather(np.array(all_checks))
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump({"metrics": metrics_out, "checks": checks,
                       "all_processes_ok": bool(np.all(everyone))}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
