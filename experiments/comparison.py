"""The built-in comparison `make demo` runs: the RLHF family on one verifiable task, over seeds.

Per seed: SFT a tiny Llama on reversed-digit addition for a fixed number of
steps -> sample answers and label (correct, wrong) pairs with the verifier,
the stand-in for human raters -> train a Bradley–Terry reward model -> from
the same SFT weights and with the same number of optimiser steps, every run
of `config.algorithms` (DPO, RPO, PPO on the reward model or the verifier,
and the on-policy presets). Each run is measured the same way: held-out
greedy accuracy, KL to the SFT policy, resident models and parameters, peak
step memory, step time. Across seeds each number is reported as its mean
and a 95% confidence interval (Student's t over the seeds).

A run is a config section (`config.runs.<key>`): `label`, `kind` (`dpo` or
`onpolicy`), `lr`, `reward` (`verifier` or `reward_model`), `batch_size`
(DPO pairs per step) and `algorithm`, the section of a `DPOConfig` or of an
on-policy preset, so every field is reachable from the command line
(`--config.runs.dapo.algorithm.clip_eps_high=0.3`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx
from ml_collections import ConfigDict

from experiments import wiring
from experiments.comparison_stages import (Evaluator, build_task, label_pairs, policy_from, prompt_loader,
                                           train_reward_model, train_sft)
from jaxalign import data, models, training
from jaxalign.algorithms import dpo, evaluation, onpolicy, reward_model
from jaxalign.algorithms.common import PairStep
from jaxalign.algorithms.rollout import SamplingConfig

# ---------------------------------------------------------------------------
# Runs as config sections.


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One compared run: `algorithm` is a `DPOConfig` (kind `dpo`) or an `OnPolicyConfig`."""

    label: str
    kind: str
    lr: float
    reward: str = "verifier"
    batch_size: int = 64
    algorithm: Any = None


def dpo_run(label: str, lr: float, *, batch_size: int = 64, **algorithm) -> ConfigDict:
    """A `config.runs` entry for a DPO-family run."""
    from jaxalign.algorithms.dpo import DPOConfig

    return ConfigDict(dict(label=label, kind="dpo", lr=lr, reward="verifier", batch_size=batch_size,
                           algorithm=wiring.section(DPOConfig, **algorithm)))


def onpolicy_run(label: str, preset: str, lr: float, *, reward: str = "verifier", **algorithm) -> ConfigDict:
    """A `config.runs` entry for an on-policy preset; unset algorithm fields take the preset's values."""
    return ConfigDict(dict(label=label, kind="onpolicy", lr=lr, reward=reward, batch_size=0,
                           algorithm=wiring.preset_section(onpolicy.OnPolicyConfig, preset, **algorithm)))


def resolve_run(key: str, sec) -> RunSpec:
    """`config.runs.<key>` -> its typed `RunSpec`."""
    values = wiring.as_dict(sec)
    algo = values.pop("algorithm", None)
    spec = wiring.typed(RunSpec, values, f"runs.{key}")
    if spec.kind == "dpo":
        algorithm = wiring.typed(dpo.DPOConfig, algo, f"runs.{key}.algorithm")
    elif spec.kind == "onpolicy":
        algorithm = wiring.onpolicy_algorithm(algo, f"runs.{key}.algorithm")
    else:
        raise wiring.ConfigError(f"config.runs.{key}.kind {spec.kind!r}: dpo or onpolicy")
    if spec.reward not in ("verifier", "reward_model"):
        raise wiring.ConfigError(f"config.runs.{key}.reward {spec.reward!r}: verifier or reward_model")
    return dataclasses.replace(spec, algorithm=algorithm)


def selected_runs(cfg) -> dict[str, RunSpec]:
    """The runs of `config.algorithms` (comma-separated keys of `config.runs`), in order."""
    keys = [k.strip() for k in cfg.algorithms.split(",") if k.strip()]
    if cfg.get("new_presets"):
        keys += [k for k in NEW_PRESETS if k not in keys]
    missing = [k for k in keys if k not in cfg.runs]
    if missing:
        raise wiring.ConfigError(f"config.algorithms: no run {missing[0]!r}; valid: {', '.join(cfg.runs.keys())}")
    return {k: resolve_run(k, cfg.runs[k]) for k in keys}


NEW_PRESETS = ("gspo", "cispo", "rloo", "reinforce_pp")


# ---------------------------------------------------------------------------
# One seed.


@dataclasses.dataclass
class Run:
    """One algorithm's run: what it trains, how a step is taken, and what it keeps resident."""

    name: str
    state: object
    step_fn: object  # (state, batch) -> (state, metrics)
    batches: object  # iterator of batches
    policy_params: object  # state.params -> the policy's params
    resident: list[tuple[str, int]]  # (model, parameter count)
    train_step: object  # the jitted TrainStep (for the memory analysis)
    memory_batch: object  # batch -> a batch of the train step's shape


def _optimizer(lr: float):
    return training.make_optimizer(training.OptimConfig(lr=lr, schedule="constant", grad_clip_norm=1.0))


def setup_dpo(spec: RunSpec, seed: int, model, sft_params, pairs) -> Run:
    policy = policy_from(model, sft_params)
    ref_fn = dpo.make_reference_fn(policy_from(model, sft_params))
    loader = data.Loader(pairs, batch_size=spec.batch_size, seed=seed)
    table = dpo.precompute_reference(ref_fn, pairs, batch_size=spec.batch_size)
    opt = _optimizer(spec.lr)
    state, mdef = training.init_train_state(policy, opt, seed=seed)
    step = PairStep(training.make_train_step(dpo.make_dpo_loss_fn(spec.algorithm), opt, model_def=mdef,
                                             shardings=training.state_shardings(state)))
    batches = (dpo.attach_reference(b, table=table) for b in loader)
    n = evaluation.count_params(sft_params)
    return Run(spec.label, state, step, batches, lambda p: p, [("policy (reference log-probs precomputed)", n)],
               step, lambda batch: batch)


def setup_onpolicy(spec: RunSpec, seed: int, cfg, task, model, sft_params, scorer, rm_params: int | None) -> Run:
    """An on-policy preset from the SFT weights; rewarded by the verifier or by the reward model `scorer`."""
    algorithm = dataclasses.replace(spec.algorithm, prompts_per_step=cfg.budget.prompts_per_step)
    loader = prompt_loader(cfg, task, seed=seed + 7, batch_size=algorithm.prompts_per_step)
    by_model = spec.reward == "reward_model"
    built = onpolicy.build(algorithm, SamplingConfig(max_new_tokens=task.max_new_tokens),
                           policy_from(model, sft_params), tokenizer=task.tokenizer,
                           reward_fn=scorer if by_model else task.reward_fn, prompts=loader,
                           optimizer=_optimizer(spec.lr), seed=seed,
                           reference=policy_from(model, sft_params) if algorithm.needs_reference else None)
    n = evaluation.count_params(sft_params)
    resident = [("actor" if algorithm.uses_critic else "policy", n)]
    if algorithm.uses_critic:
        resident.append(("critic", evaluation.count_params(built.state.params["critic"])))
    if algorithm.needs_reference:
        resident.append(("reference", n))
    if by_model:
        resident.append(("reward model", rm_params))
    return Run(spec.label, built.state, built.step, loader, built.policy_params, resident, built.step.train_step,
               built.step.batch_like)


def execute(run: Run, cfg, evaluator: Evaluator) -> tuple[dict, list[dict]]:
    """Train `run` for the shared budget; evaluate every `eval.every` steps (eval time excluded)."""
    state = run.state
    curve = [{"step": 0, "time_s": 0.0, **evaluator(run.policy_params(state.params))}]
    before = curve[0]["accuracy"]
    train_time, step_times = 0.0, []
    bar = tqdm.tqdm(total=cfg.budget.steps, desc=run.name, dynamic_ncols=True, leave=False)
    memory = None
    for i in range(1, cfg.budget.steps + 1):
        batch = next(run.batches)
        t0 = time.perf_counter()
        state, m = run.step_fn(state, batch)
        jax.block_until_ready(state.params)
        dt = time.perf_counter() - t0
        train_time += dt
        if i > 1:
            step_times.append(dt)  # the first step includes compilation
        if memory is None:
            memory = evaluation.step_memory_bytes(run.train_step, state, run.memory_batch(batch))
        bar.update(1)
        if i % cfg.eval.every == 0 or i == cfg.budget.steps:
            point = {"step": i, "time_s": train_time, **evaluator(run.policy_params(state.params))}
            for k in ("reward_mean", "response_length_mean", "loss", "groups_drawn", "groups_kept",
                      "zero_variance_groups"):
                if k in m:
                    point[k] = float(m[k])
            curve.append(point)
            bar.set_postfix(acc=f"{point['accuracy']:.3f}", kl=f"{point['kl_to_sft']:.2f}")
    bar.close()
    row = {"algorithm": run.name,
           "models_resident": " + ".join(name for name, _ in run.resident),
           "params_resident": int(sum(n for _, n in run.resident)),
           "peak_bytes": memory,
           "step_time_s": float(np.median(step_times)) if step_times else train_time,
           "accuracy_before": before, "accuracy_after": curve[-1]["accuracy"],
           "kl_to_ref": curve[-1]["kl_to_sft"]}
    return row, curve


def run_seed(config, seed: int, runs: dict[str, RunSpec], *, save: bool = False) -> tuple[list[dict], dict, dict]:
    """The whole pipeline for one seed: (rows, curves by run, meta). Pairs and the reward
    model are built only when a run needs them. save: write the SFT (and reward model)
    checkpoints that the per-algorithm configs (experiments/configs/*_arithmetic.py) start from."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.seed = seed  # the stages read `cfg.seed`
    task = build_task(cfg)
    t0 = time.perf_counter()
    model, sft_params, sft_history = train_sft(cfg, task)
    meta = {"seed": seed, "sft_steps": sft_history[-1]["step"], "sft_time_s": time.perf_counter() - t0,
            "sft_accuracy": sft_history[-1]["accuracy"]}
    evaluator = Evaluator(task, model, sft_params)
    needs_pairs = any(s.kind == "dpo" or s.reward == "reward_model" for s in runs.values())
    pairs = scorer = rm_params = None
    if needs_pairs:
        pairs = label_pairs(cfg, task, model, sft_params, reference_fallback=cfg.pairs.reference_fallback)
        meta["pairs"] = len(pairs)
    if any(s.reward == "reward_model" for s in runs.values()):
        scorer, meta["reward_model"] = train_reward_model(cfg, model, sft_params, pairs)
        rm_params = evaluation.count_params(scorer.state)
        if save:
            models.save_hf(nnx.merge(scorer.graphdef, scorer.state), os.path.join(cfg.workdir, "reward_model"),
                           tokenizer=task.tokenizer,
                           extra_config={reward_model.NORM_KEY: {"mean": scorer.mean, "std": scorer.std}})
    if save:
        models.save_hf(model, os.path.join(cfg.workdir, "sft"), tokenizer=task.tokenizer)
    rows, curves = [], {"SFT": sft_history}
    for spec in runs.values():
        run = (setup_dpo(spec, seed, model, sft_params, pairs) if spec.kind == "dpo" else
               setup_onpolicy(spec, seed, cfg, task, model, sft_params, scorer, rm_params))
        row, curve = execute(run, cfg, evaluator)
        rows.append(row)
        curves[spec.label] = curve
    return rows, curves, meta


# ---------------------------------------------------------------------------
# Across seeds.


def mean_ci(values, confidence: float = 0.95) -> tuple[float, list[float] | None]:
    """Mean and the two-sided Student-t confidence interval of the mean (None for one value)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, [mean - half, mean + half]


SUMMARISED = ("accuracy_before", "accuracy_after", "accuracy_gain", "kl_to_ref", "step_time_s", "peak_bytes")


def aggregate(per_seed: list[list[dict]], seeds: list[int]) -> list[dict]:
    """One row per run: the mean of every summarised column, its `_ci` and the per-seed values.

    `accuracy_gain` is after − before within each seed (a paired difference): its interval
    leaves out how much the SFT start itself varies between seeds.
    """
    rows = []
    for i, first in enumerate(per_seed[0]):
        rs = [{**seed_rows[i], "accuracy_gain": seed_rows[i]["accuracy_after"] - seed_rows[i]["accuracy_before"]}
              for seed_rows in per_seed]
        row = {k: first[k] for k in ("algorithm", "models_resident", "params_resident")}
        row["seeds"] = list(seeds)
        row["per_seed"] = {k: [r[k] for r in rs] for k in SUMMARISED}
        for k in SUMMARISED:
            vals = [v for v in row["per_seed"][k] if v is not None]
            row[k], row[f"{k}_ci"] = mean_ci(vals) if vals else (None, None)
        rows.append(row)
    return rows


def mean_curves(curves_by_seed: list[dict]) -> dict:
    """Per run, the mean over seeds at each evaluated step (and the CI of the accuracy)."""
    out = {}
    for name in curves_by_seed[0]:
        points = []
        for j, p in enumerate(curves_by_seed[0][name]):
            pts = [c[name][j] for c in curves_by_seed if j < len(c[name])]
            point = {k: float(np.mean([q[k] for q in pts if k in q])) for k in p if k != "step"}
            point["step"] = p["step"]
            if "accuracy" in p:
                point["accuracy_ci"] = mean_ci([q["accuracy"] for q in pts])[1]
            points.append(point)
        out[name] = points
    return out


def run_comparison(cfg) -> tuple[list[dict], dict, dict]:
    """`config.seeds` seeds from `config.seed` through the pipeline: (rows, mean curves, meta)."""
    runs = selected_runs(cfg)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    per_seed, curves, metas = [], [], []
    for seed in seeds:
        print(f"seed {seed} ({len(metas) + 1} of {len(seeds)})")
        rows, c, meta = run_seed(cfg, seed, runs, save=seed == seeds[0])
        per_seed.append(rows)
        curves.append(c)
        metas.append(meta)
    meta = {"seeds": seeds, "per_seed": metas, "budget": dict(cfg.budget)}
    for key in ("sft_accuracy", "sft_time_s", "pairs"):
        if key in metas[0]:
            meta[key], meta[f"{key}_ci"] = mean_ci([m[key] for m in metas])
    if "reward_model" in metas[0]:
        meta["reward_model"] = {k: mean_ci([m["reward_model"][k] for m in metas])[0] for k in metas[0]["reward_model"]}
    meta["sft_steps"] = metas[0]["sft_steps"]
    return aggregate(per_seed, seeds), mean_curves(curves), meta
