"""Plan a run before launch: every program it executes, compiled ahead of time for a TPU topology.

    python experiments/plan.py --config experiments/configs/grpo_gsm8k.py \
        --model experiments/configs/shapes/llama-3.1-8b \
        --topology v5p:2x2x4 --config.mesh.fsdp=-1 --config.mesh.data=1 [--fit] [--json plan.json]

No TPU and no weights are needed: the model is built from its `config.json`
alone (`nnx.eval_shape`), every program of the run is traced on
`jax.ShapeDtypeStruct`s sharded by the experiment's own mesh config and the
rules of `jaxalign.sharding`, and libtpu's compiler (`pip install
"jaxalign[tpu]"`) compiles it for the named topology (`v5e:2x2`, `v5p:2x2x4`,
`v6e:2x4`, ... as libtpu spells them). XLA's memory analysis gives the bytes
per chip; the time per step is a roofline bound from the model's FLOPs and the
bytes each program moves (XLA's cost model counts the scanned layer body once;
docs/scale.md).

Programs: the train step (gradient and update; one row each when the step
runs as two programs); DPO's reference log-probs; for on-policy runs the
sampler's prefill and one decode step at the rollout's shapes, the log-probs
of the old policy (and of the reference, the same program on other
parameters), PPO's critic values and the reward model's scores.

LoRA (`model.lora.rank > 0`): the policy is built as the run builds it
(`attach_lora`, then `quantize_base`), so the train state's gradient and
optimizer moments cover the adapters alone; its reference is the base with
the adapters off, on the same parameters (no resident copy): DPO's table or
in-step reference, the on-policy reference log-probs program.

Memory per chip: what stays resident for the whole run (train state,
reference, reward model) plus, for each program, what it holds beyond that
(its batch, temporaries and outputs less donated buffers); the run's peak is
the largest such sum. `--fit` searches `train.micro_batches` and
`model.remat` for the fastest setting that fits and prints the overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import wiring  # noqa: E402
from experiments.plan_programs import GIB, Chip, Planner, Program  # noqa: E402

# libtpu looks for the TPU VM it runs on at its first use; these say "no pod here" so that compiling
# for an abstract topology prints nothing (values already set, on a real TPU VM, win). Its lockfile
# would let only one process on the machine compile at a time: plans need no chip, so several may.
for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-1"), ("TPU_WORKER_ID", "0"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_key, _value)

# Per chip as Google lists them, by the device kind libtpu reports: HBM bytes, peak bf16 FLOP/s, HBM bytes/s.
CHIPS = {"TPU v4": (32 * GIB, 275e12, 1.2e12), "TPU v5 lite": (16 * GIB, 197e12, 0.82e12),
         "TPU v5": (95 * GIB, 459e12, 2.76e12), "TPU v6 lite": (32 * GIB, 918e12, 1.64e12)}
REMAT_ORDER = ("none", "save_dots", "full")  # fastest first: less recomputation in the backward pass

def topology(name: str):
    """(devices, HBM bytes per device) of a libtpu topology name; a bad name fails in one line."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 - libtpu missing, or its error for an unknown name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise wiring.ConfigError(f"--topology {name!r}: libtpu cannot build it ({first}); names look like "
                                 "v5e:2x2, v5p:2x2x4, v6e:2x4 (pip install 'jaxalign[tpu]')") from None
    devices = list(topo.devices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise wiring.ConfigError(f"--topology {name!r}: no HBM size known for device kind {kind!r}")
    share = math.prod(int(d) for d in name.split(":", 1)[1].split("x")) / len(devices)  # chips per device
    hbm, flops, bandwidth = CHIPS[kind]
    return devices, Chip(int(hbm * share), flops * share, bandwidth * share)


def report(train: list[Program], others: list[Program], resident: dict, *, topology_name: str, devices: int,
           hbm: int, overrides: dict) -> dict:
    """The plan as the documented JSON schema (docs/scale.md): one entry per program, the peak per chip."""
    total = sum(resident.values())
    rows = []
    for prog in train + others:
        extra = prog.argument_bytes - prog.resident + prog.temp_bytes + prog.output_bytes - prog.alias_bytes
        rows.append({**dataclasses.asdict(prog), "peak_bytes": total + extra})
    peak = max(r["peak_bytes"] for r in rows)
    return {"fits": peak <= hbm, "topology": topology_name, "chips": devices, "hbm_per_chip_bytes": hbm,
            "peak_bytes_per_chip": peak, "resident_bytes": resident,
            "step_estimated_s": sum(r["estimated_s"] * r["runs"] for r in rows),
            "compile_s": sum(r["compile_s"] for r in rows), "programs": rows, "suggested_overrides": overrides}


def table(plan: dict) -> str:
    """The plan as lines of text: one row per program, then the resident state and the verdict."""
    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    lines = [f"{'program':34} {'runs':>5} {'args GiB':>8} {'temp GiB':>8} {'out GiB':>8} {'peak GiB':>8} "
             f"{'TFLOP/chip':>10} {'est s':>8} {'compile s':>9}"]
    for r in plan["programs"]:
        lines.append(f"{r['name']:34} {r['runs']:5d} {gib(r['argument_bytes'])} {gib(r['temp_bytes'])} "
                     f"{gib(r['output_bytes'])} {gib(r['peak_bytes'])} {r['flops'] / 1e12:10.3f} "
                     f"{r['estimated_s']:8.4f} {r['compile_s']:9.1f}")
    held = ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan["resident_bytes"].items())
    lines.append(f"resident per chip (GiB): {held}")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"{plan['topology']} ({plan['chips']} chips): peak {plan['peak_bytes_per_chip'] / GIB:.2f} GiB of "
                 f"{plan['hbm_per_chip_bytes'] / GIB:.0f} GiB HBM per chip: {verdict}; one training step "
                 f">= {plan['step_estimated_s']:.3f} s (roofline); compiles {plan['compile_s']:.1f} s here")
    if plan["suggested_overrides"]:
        lines.append("overrides: " + " ".join(f"--config.{k}={v}" for k, v in plan["suggested_overrides"].items()))
    return "\n".join(lines)


def _micro_batch_choices(planner: Planner) -> list[int]:
    """Micro-batch counts that split the step's rows evenly."""
    cfg = planner.cfg
    if planner.online:
        algo = cfg["algorithm"]
        rows = algo.prompts_per_step * algo.group_size // algo.minibatches
    else:
        rows = cfg["data"].batch_size
    return [m for m in (1, 2, 4, 8, 16, 32, 64) if rows % m == 0]


def plan(config, model_dir: str, topology_name: str, *, fit: bool = False, log=print) -> dict:
    """Compile every program of the run `config` describes for `topology_name`; the plan as a dict.

    fit: search `train.micro_batches` (1, 2, 4, ...) for each `model.remat` policy (none, save_dots,
    full), keep the fastest setting whose peak fits, and report its overrides.
    """
    devices, chip = topology(topology_name)
    planner = Planner(config, model_dir, devices, chip, log=log)
    others, resident = planner.other_programs()
    model, train_cfg = planner.cfg["model"], planner.cfg["train"]
    remat = getattr(model, "remat", "none")

    def attempt(remat: str, micro: int) -> dict:
        train, held = planner.train_programs(remat=remat, micro_batches=micro)
        overrides = {}
        if fit:
            overrides = {"model.remat": remat, "train.micro_batches": micro}
        return report(train, others, {**held, **resident}, topology_name=topology_name, devices=len(devices),
                      hbm=chip.hbm, overrides=overrides)

    if not fit:
        return attempt(remat, train_cfg.micro_batches)
    best, best_key, tried = None, None, []
    for policy in REMAT_ORDER:
        for micro in _micro_batch_choices(planner):
            result = attempt(policy, micro)
            tried.append({"model.remat": policy, "train.micro_batches": micro, "fits": result["fits"],
                          "peak_bytes_per_chip": result["peak_bytes_per_chip"],
                          "step_estimated_s": result["step_estimated_s"]})
            log(f"[plan] remat={policy} micro_batches={micro}: peak {result['peak_bytes_per_chip'] / GIB:.2f} GiB, "
                f"{'fits' if result['fits'] else 'does not fit'}", flush=True)
            if result["fits"]:
                # Ties (the roofline sees the same FLOPs) go to fewer micro-batches: each one gathers
                # the FSDP-sharded weights again; then to less recomputation.
                key = (result["step_estimated_s"], micro, REMAT_ORDER.index(policy))
                if best is None or key < best_key:
                    best, best_key = result, key
                break  # more micro-batches only repeat the weights' gathers
        if best_key is not None and best_key[1] == 1:
            break  # one micro-batch fits: a later policy only recomputes more
    if best is None:
        best = attempt(remat, train_cfg.micro_batches)
        best["suggested_overrides"] = {}
    best["fit_search"] = tried
    return best


def main() -> None:
    from absl import flags

    from experiments.cli import launch

    flags.DEFINE_string("topology", None, "a TPU topology as libtpu names it, e.g. v5p:2x2x4")
    flags.DEFINE_bool("fit", False, "search micro-batches and the remat policy for a setting that fits")
    flags.DEFINE_string("json", None, "also write the plan to this JSON file")
    flags.mark_flags_as_required(["topology"])
    # A plan measures cold compiles: the persistent compilation cache would answer the second run.
    os.environ["JAXALIGN_COMPILE_CACHE"] = "0"

    # `--model DIR` is `--config.model.path=DIR` (checked to exist before anything is imported).
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            argv[i:i + 2] = [f"--config.model.path={argv[i + 1]}"]
            break
        if arg.startswith("--model="):
            argv[i] = "--config.model.path=" + arg.split("=", 1)[1]

    def run(config):
        model_dir = config.model.path
        if not model_dir:
            raise wiring.ConfigError("--model: give a directory holding config.json (or set config.model.path)")
        result = plan(config, model_dir, flags.FLAGS.topology, fit=flags.FLAGS.fit)
        print(table(result))
        if flags.FLAGS.json:
            with open(flags.FLAGS.json, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        return result

    launch(run)


if __name__ == "__main__":
    main()
