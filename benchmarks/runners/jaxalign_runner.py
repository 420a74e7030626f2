"""jaxalign's side of the benchmark workloads (see benchmarks/workloads.py).

    python benchmarks/runners/jaxalign_runner.py --model tiny --model-dir DIR --workload dpo_step --out rows.json

Uses the library the way `experiments/` does: `load_hf`, `training.make_train_step`
with the DPO loss, a live frozen reference, `onpolicy.build` (sampling, rewards,
old and reference log-probs, advantages, one AdamW step) and `Sampler` (built
on `abstract_hf`'s shapes and precompiled before `load_hf` reads the weights,
as a user with fixed shapes can).
Besides the timing and `peak_rss` rows it reports `model_flops` per step
(`workloads.step_flops`) so the orchestrator can compute MFU. Timing as every
runner does (benchmarks/workloads.py): warm-up steps, then `steps` steps end to
end with one `block_until_ready` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _pin(argv):
    if "--threads" in argv:
        n = int(argv[argv.index("--threads") + 1])
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


_pin(sys.argv)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hide_torch():
    """Run as if torch were not installed, as in a jaxalign install.

    torch is a test-only dependency, but this runner runs in the test venv,
    where transformers imports torch merely to read a config (its RoPE helpers
    do when torch is installed): ~280 MB of resident memory that jaxalign
    itself never uses.
    """
    sys.modules["torch"] = None


import workloads  # noqa: E402

FW = "jaxalign"
T0 = time.time()  # the launch, unless bench.py passes its own (--t0)


def forward_flops(cfg, tokens: int, context: int, head_tokens: int | None = None) -> float:
    """`workloads.forward_flops` for a jaxalign `ModelConfig`."""
    hf = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              vocab_size=cfg.vocab_size)
    return workloads.forward_flops(hf, tokens, context, head_tokens)


def _hf_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _common_rows(workload: str, model_name: str, first: float, first_end: float, flops: dict) -> list[dict]:
    """`first_step`, `time_to_first_step` (launch to `first_end`, a `time.time()`) and the FLOP rows."""
    return [workloads.row(workload, model_name, FW, "first_step", first, "s", note="compilation included"),
            workloads.row(workload, model_name, FW, "time_to_first_step", first_end - T0, "s",
                          note="launch to the end of the first step"),
            *(workloads.row(workload, model_name, FW, k, v, "FLOP") for k, v in flops.items())]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


class DPOSetup(NamedTuple):
    step: Any          # the TrainStep
    state: Any         # its TrainState
    batch: dict        # the preference batch, without reference log-probs
    ref_fn: Any        # batch -> reference log-probs (a live frozen reference)
    cfg: Any           # the ModelConfig
    loss_fn: Any       # the step's loss, for `dpo_parts`
    model_def: Any     # params -> model, for `dpo_parts`


def build_dpo(model_dir: str, s: dict) -> DPOSetup:
    """The `dpo_step` workload set up as `experiments/train.py` does (its wiring, default `config.train`).

    Shared with `benchmarks/profile_step.py`, so the profile traces the benchmarked step.
    """

    import numpy as np

    from experiments import wiring
    from jaxalign import training
    from jaxalign.algorithms import dpo
    from jaxalign.algorithms.common import PairStep
    from jaxalign.data import collate_preference
    from jaxalign.models import clone_model, load_hf

    model, cfg = load_hf(model_dir)
    prompt, chosen, rejected = workloads.dpo_batch(cfg.vocab_size, s)
    c = [np.concatenate([p, x]) for p, x in zip(prompt, chosen)]
    r = [np.concatenate([p, x]) for p, x in zip(prompt, rejected)]
    length = s["prompt_len"] + s["completion_len"]
    batch = collate_preference(c, r, [s["prompt_len"]] * s["pairs"], length=length, pad_id=0)
    ref_fn = dpo.make_reference_fn(clone_model(model))
    loss_fn = dpo.make_dpo_loss_fn(dpo.DPOConfig(beta=workloads.DPO_BETA))
    optimizer = training.make_optimizer(training.OptimConfig(
        lr=workloads.LR, schedule="constant", warmup_steps=0, weight_decay=workloads.WEIGHT_DECAY,
        grad_clip_norm=workloads.GRAD_CLIP))
    state, model_def = training.init_train_state(model, optimizer)
    step = PairStep(wiring.build_train_step(loss_fn, optimizer, state, model_def, wiring.TrainSection()))
    return DPOSetup(step, state, batch, ref_fn, cfg, loss_fn, model_def)


def dpo_step(model_dir: str, model_name: str, s: dict) -> list[dict]:
    import jax

    from jaxalign.algorithms import dpo

    step, state, batch, ref_fn, cfg, _, _ = build_dpo(model_dir, s)

    def one(state):
        return step(state, dpo.attach_reference(batch, ref_fn=ref_fn))

    t = time.perf_counter()
    state, metrics = one(state)
    jax.block_until_ready(state.params)
    first, first_end = time.perf_counter() - t, time.time()
    for _ in range(s["warmup"] - 1):
        state, metrics = one(state)
    jax.block_until_ready(state.params)
    t = time.perf_counter()
    for _ in range(s["steps"]):
        state, metrics = one(state)
    jax.block_until_ready(state.params)
    step_time = (time.perf_counter() - t) / s["steps"]
    # The LM head runs on the score_width response columns only (the loss never reads the prompt's logits).
    flops = workloads.step_flops(FW, "dpo_step", _hf_config(model_dir), s, score_width=batch["score_width"])
    loss = float(metrics["loss"]) if "loss" in metrics else float("nan")
    return [workloads.row("dpo_step", model_name, FW, "step_time", step_time, "s",
                          note=f"live reference; {s['steps']} steps end to end, one sync; last loss {loss:.4f}"),
            *_common_rows("dpo_step", model_name, first, first_end, flops)]


def _loss_and_grad(loss_fn, model_def, params, arrays, options: dict | None = None):
    """The train step's loss and gradient compiled alone (same compiler options; no optimizer,
    gradient norm or NaN guard): `(params, arrays) -> (loss, grads)`. `options`: the step's
    static options (DPO's `last`)."""
    import jax

    from jaxalign.host import train_step_compiler_options

    def loss(params, arrays):
        (num, den), _ = loss_fn(model_def.merge(params), arrays, None, **(options or {}))
        return num / den

    compiler = train_step_compiler_options(jax.devices()[0].platform)
    return jax.jit(jax.value_and_grad(loss)).lower(params, arrays).compile(compiler)


def gemm_rate():
    """A callable that measures XLA's f32 GEMM rate now, in GFLOP/s: the faster of a 1024² and a
    2048² product, each the median of three runs. `_in_turn` calls it between the parts, so that
    each round's part times have a ceiling measured seconds away on a machine whose speed drifts."""
    import jax
    import jax.numpy as jnp

    products = []
    for n in (1024, 2048):
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, a).block_until_ready()
        products.append((n, f, a))

    def rate() -> float:
        best = 0.0
        for n, f, a in products:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                f(a, a).block_until_ready()
                times.append(time.perf_counter() - t)
            best = max(best, 2 * n ** 3 / _median(times) / 1e9)
        return best

    return rate


def paired_mfu(flops: float, part_times: list[float], rates: list[float]) -> float:
    """Median over rounds of `flops / part_time / rate` (in %): each round's time against the GEMM
    rate measured in the same round (GFLOP/s)."""
    return _median([100.0 * flops / t / (r * 1e9) for t, r in zip(part_times, rates, strict=True)])


def _in_turn(parts: dict, step, state, batch, s: dict, rate=None) -> tuple[dict[str, list[float]], Any]:
    """Runs each of `parts` (state -> arrays) and then the train step, in turn, `warmup` + `steps`
    times; the wall times of the last `steps` rounds per part (the step's under "step"), and with
    `rate` (see `gemm_rate`) each round's GEMM rate under "gflops", measured before its parts."""
    import jax

    times: dict[str, list[float]] = {name: [] for name in (*parts, "step", "gflops")}
    for i in range(s["warmup"] + s["steps"]):
        if rate is not None and i >= s["warmup"]:
            times["gflops"].append(rate())
        for name, fn in parts.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(state))
            if i >= s["warmup"]:
                times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        state, _ = step(state, batch)
        jax.block_until_ready(state.params)
        if i >= s["warmup"]:
            times["step"].append(time.perf_counter() - t)
    return times, state


def _paired_rows(workload: str, model_name: str, flops: float, matmul_times: list[float],
                 rates: list[float]) -> list[dict]:
    note = f"each round against the GEMM rate measured in it: {', '.join(f'{r:.1f}' for r in rates)} GFLOP/s"
    return [workloads.row(workload, model_name, FW, "paired_ceiling", _median(rates), "GFLOP/s", note=note),
            workloads.row(workload, model_name, FW, "matmul_mfu_paired", paired_mfu(flops, matmul_times, rates), "%",
                          note=note)]


def dpo_parts(model_dir: str, model_name: str, s: dict) -> list[dict]:
    """The `dpo_step` workload taken apart: reference forward, policy forward + backward alone, train step.

    The forward + backward is the step's loss and gradient compiled on their own (same compiler
    options), without the optimizer update, the gradient norm and the NaN guard: the step's
    matmul-bound work. The three run in turn, `steps` times after `warmup`; medians.
    """
    from jaxalign.algorithms import dpo
    from jaxalign.algorithms.common import pair_options

    step, state, batch, ref_fn, cfg, loss_fn, model_def = build_dpo(model_dir, s)
    full = dpo.attach_reference(batch, ref_fn=ref_fn)
    arrays, options = pair_options(full)  # the scored width: a static option, as in the train step
    width, arrays = options["last"], step.train_step.place_batch(arrays)
    fwd_bwd = _loss_and_grad(loss_fn, model_def, state.params, arrays, options)
    times, state = _in_turn({"reference": lambda st: dpo.attach_reference(batch, ref_fn=ref_fn),
                             "fwd_bwd": lambda st: fwd_bwd(st.params, arrays)},
                            step, state, full, s, rate=gemm_rate())
    length = s["prompt_len"] + s["completion_len"]
    forward = forward_flops(cfg, 2 * s["pairs"] * length, length, head_tokens=2 * s["pairs"] * width)
    ref_t, fb_t, step_t = (_median(times[k]) for k in ("reference", "fwd_bwd", "step"))
    note = "reference forward + policy forward/backward, no optimizer"
    return [workloads.row("dpo_parts", model_name, FW, "reference_time", ref_t, "s"),
            workloads.row("dpo_parts", model_name, FW, "fwd_bwd_time", fb_t, "s"),
            workloads.row("dpo_parts", model_name, FW, "train_step_time", step_t, "s",
                          note="the train step alone (forward, backward, gradient norm, AdamW)"),
            workloads.row("dpo_parts", model_name, FW, "optimizer_time", step_t - fb_t, "s",
                          note="train step less forward/backward: gradient norm, NaN guard, AdamW"),
            workloads.row("dpo_parts", model_name, FW, "matmul_time", ref_t + fb_t, "s", note=note),
            workloads.row("dpo_parts", model_name, FW, "matmul_flops", 4 * forward, "FLOP", note=note),
            *_paired_rows("dpo_parts", model_name, 4 * forward,
                          [r + f for r, f in zip(times["reference"], times["fwd_bwd"])], times["gflops"])]


class GRPOSetup(NamedTuple):
    step: Any          # the OnPolicyStep (rollout + train step)
    state: Any         # its TrainState
    batch: dict        # the prompt batch
    cfg: Any           # the ModelConfig
    train_step: Any    # the TrainStep inside `step`, for `grpo_parts`
    loss_fn: Any       # the group loss, for `grpo_parts`
    model_def: Any     # params -> model, for `grpo_parts`


def build_grpo(model_dir: str, s: dict) -> GRPOSetup:
    """The `grpo_step_g*` workloads set up as `experiments/rl.py` does (its wiring, default `config.train`)."""
    import numpy as np
    from transformers import AutoTokenizer

    from experiments import wiring
    from jaxalign import training
    from jaxalign.algorithms import onpolicy
    from jaxalign.data import collate_prompts
    from jaxalign.models import load_hf

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, mcfg = load_hf(model_dir)
    g, n = s["G"], s["new_tokens"]
    prompt_ids = workloads.prompts(mcfg.vocab_size, s["prompts"], s["prompt_len"])
    batch = collate_prompts(list(prompt_ids), length=s["prompt_len"], pad_id=0)
    batch["prompts"] = [""] * s["prompts"]
    batch["answers"] = [""] * s["prompts"]

    def reward_fn(rollout):
        return np.asarray([workloads.reward(row[-n:]) for row in np.asarray(rollout.tokens)], np.float32)

    cfg = onpolicy.preset("grpo", group_size=g, prompts_per_step=s["prompts"], beta=workloads.GRPO_BETA,
                          clip_eps_low=workloads.GRPO_EPS)
    sampling = onpolicy.SamplingConfig(max_new_tokens=n, temperature=1.0)
    optimizer = training.make_optimizer(training.OptimConfig(
        lr=workloads.LR, schedule="constant", warmup_steps=0, weight_decay=workloads.WEIGHT_DECAY,
        grad_clip_norm=workloads.GRAD_CLIP))
    model_def = training.ModelDef.of(model)[0]
    run = wiring.build_onpolicy(cfg, sampling, model, tokenizer=tokenizer, reward_fn=reward_fn, prompts=iter(()),
                                optimizer=optimizer, mesh=None, seed=0, train=wiring.TrainSection())
    run.step.eos_ids = ()  # the workload generates exactly new_tokens tokens
    return GRPOSetup(run.step, run.state, batch, mcfg, run.step.train_step, onpolicy.make_loss_fn(cfg, sampling),
                     model_def)


def _grpo_train_flops(mcfg, s: dict) -> float:
    """The policy's forward and backward on the rollout (3x a forward; the LM head on the completion)."""
    rows_n, total = s["prompts"] * s["G"], s["prompt_len"] + s["new_tokens"]
    return 3 * forward_flops(mcfg, rows_n * total, total, head_tokens=rows_n * s["new_tokens"])


def grpo_step(model_dir: str, model_name: str, s: dict, workload: str) -> list[dict]:
    import jax

    step, state, batch, mcfg, _, _, _ = build_grpo(model_dir, s)
    n = s["new_tokens"]
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(state.params)
    first, first_end = time.perf_counter() - t, time.time()
    for _ in range(s["warmup"] - 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(state.params)
    # Each step syncs by itself (the rewards are computed on the host from the sampled tokens), so
    # the host's intervals between steps are per-step times too; nothing is added to get them.
    stamps, gen, lengths = [time.perf_counter()], [], []
    for _ in range(s["steps"]):
        state, metrics = step(state, batch)
        stamps.append(time.perf_counter())
        gen.append(metrics["rollout_time_s"])
        lengths.append(metrics["response_length_mean"])
    jax.block_until_ready(state.params)
    step_time = (time.perf_counter() - stamps[0]) / s["steps"]
    if any(float(x) != n for x in lengths):
        raise RuntimeError(f"generated {sorted({float(x) for x in lengths})} tokens per row, not {n}")
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    # The reference forward and the recomputation of the old log-probs run inside the rollout (their
    # time is in generation_time); train_flops, timed by step time less generation time, is the
    # policy's forward and backward alone.
    flops = workloads.step_flops(FW, workload, _hf_config(model_dir), s)
    return [workloads.row(workload, model_name, FW, "step_time", step_time, "s",
                          note=f"{s['steps']} steps end to end, one sync; generation {_median(gen):.3f} s of a step "
                               "(rollout incl. old and reference log-probs)"),
            workloads.row(workload, model_name, FW, "step_time_median", _median(per_step), "s",
                          note="median of the host's per-step intervals", times=[round(x, 4) for x in per_step]),
            workloads.row(workload, model_name, FW, "generation_time", _median(gen), "s"),
            *_common_rows(workload, model_name, first, first_end, flops)]


def grpo_parts(model_dir: str, model_name: str, s: dict, workload: str) -> list[dict]:
    """The training part of a `grpo_step_g*` workload taken apart, on one rollout's batch.

    After `warmup` full steps (rollout + train step), the last rollout's training batch is
    kept, and the policy's loss and gradient compiled alone (same compiler options, no
    optimizer, gradient norm or NaN guard) and the train step run on it in turn, `steps`
    times; medians. As `dpo_parts` does for the DPO step.
    """
    import jax

    step, state, batch, mcfg, train_step, loss_fn, model_def = build_grpo(model_dir, s)
    for _ in range(max(1, s["warmup"])):
        state, _ = step(state, batch)
    train_batch, _ = step.rollout(state.params, batch, int(jax.device_get(state.step)))
    arrays = train_step.place_batch(train_batch)
    fwd_bwd = _loss_and_grad(loss_fn, model_def, state.params, arrays)
    times, state = _in_turn({"fwd_bwd": lambda st: fwd_bwd(st.params, arrays)}, train_step, state, train_batch, s,
                            rate=gemm_rate())
    fb_t, step_t = _median(times["fwd_bwd"]), _median(times["step"])
    note = "policy forward/backward on one rollout batch, no optimizer"
    return [workloads.row(workload, model_name, FW, "fwd_bwd_time", fb_t, "s"),
            workloads.row(workload, model_name, FW, "train_step_time", step_t, "s",
                          note="the train step alone (forward, backward, gradient norm, AdamW)"),
            workloads.row(workload, model_name, FW, "optimizer_time", step_t - fb_t, "s",
                          note="train step less forward/backward: gradient norm, NaN guard, AdamW"),
            workloads.row(workload, model_name, FW, "matmul_time", fb_t, "s", note=note),
            workloads.row(workload, model_name, FW, "matmul_flops", _grpo_train_flops(mcfg, s), "FLOP",
                          note=note),
            *_paired_rows(workload, model_name, _grpo_train_flops(mcfg, s), times["fwd_bwd"], times["gflops"])]


def sample(model_dir: str, model_name: str, s: dict) -> list[dict]:
    import jax
    import numpy as np
    from flax import nnx

    from jaxalign.models import abstract_hf, load_hf
    from jaxalign.sampling import Sampler

    # Compile (or load from the cache) before the weights are read, so the compiler's peak
    # does not stack on them: the shapes are known up front (docs/sampling.md).
    abstract, cfg = abstract_hf(model_dir)
    sampler = Sampler(abstract)
    t = time.perf_counter()
    sampler.precompile(s["batch"], s["prompt_len"], max_new_tokens=s["new_tokens"], rng=jax.random.PRNGKey(0))
    compile_s = time.perf_counter() - t
    del abstract
    model, cfg = load_hf(model_dir)
    prompts = workloads.prompts(cfg.vocab_size, s["batch"], s["prompt_len"])
    mask = np.ones_like(prompts)
    params = nnx.state(model, nnx.Param)

    def once(i):
        return sampler(params, prompts, mask, max_new_tokens=s["new_tokens"], rng=jax.random.PRNGKey(i),
                       temperature=1.0)

    t = time.perf_counter()
    out = once(0)
    jax.block_until_ready(out.completions)
    first, first_end = compile_s + time.perf_counter() - t, time.time()
    for i in range(1, s["warmup"]):
        out = once(i)
    jax.block_until_ready(out.completions)
    t = time.perf_counter()
    for i in range(s["steps"]):
        out = once(s["warmup"] + i)
    jax.block_until_ready(out.completions)
    dt = (time.perf_counter() - t) / s["steps"]
    assert np.asarray(out.completions).shape == (s["batch"], s["new_tokens"])
    flops = workloads.step_flops(FW, "sample", _hf_config(model_dir), s)
    rows = _common_rows("sample", model_name, first, first_end, flops)
    rows[0]["note"] = "precompile + first call"
    return [workloads.row("sample", model_name, FW, "tokens_per_s", s["batch"] * s["new_tokens"] / dt, "tok/s",
                          note=f"{s['steps']} calls end to end, one sync"), *rows]


def main(argv=None) -> None:
    _hide_torch()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=sorted(workloads.MODELS))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--override", default="{}", help="JSON dict merged into the workload spec (scaling runs)")
    ap.add_argument("--t0", type=float, default=None, help="the launch's time.time() (bench.py passes it)")
    args = ap.parse_args(argv)
    global T0
    T0 = args.t0 or T0
    from jaxalign.host import enable_compilation_cache

    enable_compilation_cache()  # as the entry scripts do; under bench.py the cache is set through JAX's env
    spec_name = {"dpo_parts": "dpo_step", "grpo_parts_g4": "grpo_step_g4",
                 "grpo_parts_g8": "grpo_step_g8"}.get(args.workload, args.workload.split("@")[0])
    s = {**workloads.spec(args.model, spec_name, args.quick), **json.loads(args.override)}
    base = args.workload.split("@")[0]
    if base == "dpo_step":
        rows = dpo_step(args.model_dir, args.model, s)
    elif base == "dpo_parts":
        rows = dpo_parts(args.model_dir, args.model, s)
    elif base.startswith("grpo_step"):
        rows = grpo_step(args.model_dir, args.model, s, base)
    elif base.startswith("grpo_parts"):
        rows = grpo_parts(args.model_dir, args.model, s, base)
    elif base == "sample":
        rows = sample(args.model_dir, args.model, s)
    else:
        raise SystemExit(f"unknown workload {args.workload!r}")
    if args.workload != base:  # a scaling variant: name it
        for r in rows:
            r["workload"] = r["workload"].replace(base, args.workload, 1)
    for r in rows:
        r.setdefault("spec", s)
    rows.append(workloads.row(args.workload, args.model, FW, "peak_rss", workloads.peak_rss_mib(), "MiB"))
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
