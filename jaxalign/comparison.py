"""The built-in comparison: every algorithm of the family on one verifiable task.

SFT a tiny Llama on reversed-digit addition until it is partly right ->
sample answers and label (correct, wrong) pairs with the verifier, the
stand-in for human raters -> train a Bradley–Terry reward model -> from the
same SFT weights and with the same number of optimiser steps, run DPO,
DPO + NLL (RPO), PPO (reward model), GRPO, Dr. GRPO and DAPO (verifier).
Each run is measured the same way: held-out greedy accuracy, KL to the SFT
policy, resident models and parameters, peak step memory, step time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
import tqdm
from flax import nnx

from jaxalign import data, models, training
from jaxalign.algorithms import dpo, evaluation, group, ppo, reward_model, sft
from jaxalign.algorithms.rollout import SamplingConfig
from jaxalign.rewards import RewardModelScorer, exact_match, from_verifier
from jaxalign.sampling import Sampler
from jaxalign.tasks import arithmetic


@dataclasses.dataclass
class Task:
    tokenizer: object
    heldout: data.PromptData
    kl_prompts: data.PromptData
    reward_fn: object
    max_new_tokens: int


def _prompt_data(problems, tokenizer) -> data.PromptData:
    records = [{"prompt": p, "answer": a} for p, a in zip(problems.prompts, problems.answers)]
    return data.tokenize_prompts(records, tokenizer, max_length=arithmetic.max_prompt_len())


def build_task(cfg) -> Task:
    tok = arithmetic.load_tokenizer()
    heldout = arithmetic.held_out(cfg.eval.prompts)
    return Task(tok, _prompt_data(heldout, tok),
                _prompt_data(arithmetic.held_out(cfg.eval.kl_prompts, seed=99), tok),
                from_verifier(exact_match), cfg.max_new_tokens)


def prompt_loader(cfg, task: Task, *, seed: int, batch_size: int) -> data.Loader:
    problems = arithmetic.sample_problems(np.random.default_rng(seed), 16 * batch_size * cfg.budget.steps // 8)
    return data.Loader(_prompt_data(problems, task.tokenizer), batch_size=batch_size, seed=seed,
                       buckets=(arithmetic.max_prompt_len(),))


def new_model(model_cfg, vocab: int, seed: int) -> models.Transformer:
    over = {k: v for k, v in model_cfg.items() if k != "family"}
    return models.Transformer(models.tiny_config(model_cfg.family, vocab_size=vocab, **over), rngs=nnx.Rngs(seed))


class Evaluator:
    """Held-out greedy accuracy and KL to the SFT policy for any params of the task's model."""

    def __init__(self, task: Task, model, sft_params):
        self.task, self.sampler = task, Sampler(model)
        self.kl = evaluation.KLMeter(model, sft_params)

    def accuracy(self, params) -> float:
        t = self.task
        return evaluation.greedy_score(self.sampler, params, t.heldout, t.reward_fn, t.tokenizer,
                                       max_new_tokens=t.max_new_tokens)

    def __call__(self, params) -> dict:
        t = self.task
        return {"accuracy": self.accuracy(params),
                "kl_to_sft": self.kl(self.sampler, params, t.kl_prompts, t.tokenizer, max_new_tokens=t.max_new_tokens)}


def train_sft(cfg, task: Task):
    """SFT until held-out accuracy first passes `stop_at_accuracy` (the jump is seed-sensitive)."""
    c = cfg.sft
    tok = task.tokenizer
    problems = arithmetic.sample_problems(np.random.default_rng(cfg.seed), c.train_problems)
    records = [{"prompt": p, "completion": a} for p, a in zip(problems.prompts, problems.answers)]
    sft_data = data.tokenize_sft(records, tok, max_length=arithmetic.max_prompt_len() + arithmetic.max_answer_len())
    loader = data.Loader(sft_data, batch_size=c.batch_size, seed=cfg.seed)
    model = new_model(cfg.model, len(tok), cfg.seed)
    opt = training.make_optimizer(training.OptimConfig(lr=c.lr, schedule="constant", grad_clip_norm=1.0))
    state, mdef = training.init_train_state(model, opt, seed=cfg.seed)
    step = training.make_train_step(sft.sft_loss_fn, opt, model_def=mdef, shardings=training.state_shardings(state))
    sampler = Sampler(model)
    history, acc = [], 0.0
    bar = tqdm.tqdm(total=c.max_steps, desc="SFT", dynamic_ncols=True)
    for i in range(1, c.max_steps + 1):
        state, m = step(state, next(loader))
        bar.update(1)
        if i % c.eval_every == 0:
            acc = evaluation.greedy_score(sampler, state.params, task.heldout, task.reward_fn, tok,
                                          max_new_tokens=task.max_new_tokens)
            history.append({"step": i, "loss": float(m["loss"]), "accuracy": acc})
            bar.set_postfix(loss=f"{float(m['loss']):.3f}", acc=f"{acc:.3f}")
            if acc >= c.stop_at_accuracy:
                break
    bar.close()
    params = models.copy_tree(state.params)
    # A model holding its own copy: the train state consumed the original's arrays.
    return mdef.merge(models.copy_tree(params)), params, history


def label_pairs(cfg, task: Task, model, params, *, reference_fallback: bool = False) -> data.PreferenceData:
    """Sample from the SFT policy; the verifier picks one correct and one wrong answer per prompt.

    Prompts where no sample is right give no pair, unless `reference_fallback`
    makes the reference answer the chosen one (useful for a barely trained
    policy, e.g. in the quickstart notebook).
    """
    tok = task.tokenizer
    problems = arithmetic.sample_problems(np.random.default_rng(cfg.seed + 1), cfg.pairs.prompts)
    prompts = _prompt_data(problems, tok)
    sampler = Sampler(model)
    records = []
    for k, batch in enumerate(evaluation.batches(prompts, 512)):
        rollout, _ = _sample(sampler, params, batch, cfg.pairs.samples, task, seed=cfg.seed + 100 + k)
        ok = np.asarray(task.reward_fn(rollout)) > 0
        n = cfg.pairs.samples
        for i in range(len(batch["prompts"])):
            rows = range(i * n, (i + 1) * n)
            good = [rollout.completions[r] for r in rows if ok[r]]
            if not good and reference_fallback:
                good = [batch["answers"][i]]
            bad = [rollout.completions[r] for r in rows if not ok[r] and rollout.completions[r]]
            if good and bad:
                records.append({"prompt": batch["prompts"][i], "chosen": good[0], "rejected": bad[0]})
    return data.tokenize_preference(records, tok, max_length=arithmetic.max_prompt_len() + task.max_new_tokens + 1)


def _sample(sampler, params, batch, n, task, seed):
    from jaxalign.algorithms.rollout import sample

    return sample(sampler, params, batch, n=n, cfg=SamplingConfig(max_new_tokens=task.max_new_tokens),
                  eos_ids=(task.tokenizer.eos_token_id,), pad_id=task.tokenizer.pad_token_id, rng=jax.random.PRNGKey(seed),
                  tokenizer=task.tokenizer)


def train_reward_model(cfg, model, params, pairs) -> tuple[RewardModelScorer, dict]:
    """Bradley–Terry on the labelled pairs, starting from the SFT backbone."""
    c = cfg.reward_model
    lm = models.clone_model(model)
    nnx.update(lm, _state_of(lm, params))
    rm = models.with_value_head(lm, init="reward", rngs=nnx.Rngs(cfg.seed))
    opt = training.make_optimizer(training.OptimConfig(lr=c.lr, schedule="constant"))
    state, mdef = training.init_train_state(rm, opt, seed=cfg.seed)
    step = training.make_train_step(reward_model.reward_loss_fn, opt, model_def=mdef,
                                    shardings=training.state_shardings(state))
    loader = data.Loader(pairs, batch_size=c.batch_size, seed=cfg.seed)
    accs = []
    for _ in tqdm.trange(c.steps, desc="reward model", dynamic_ncols=True):
        state, m = step(state, next(loader))
        accs.append(float(m["accuracy"]))
    trained = mdef.merge(state.params)
    scorer_fn = jax.jit(lambda p, b: reward_model.pair_scores(mdef.merge(p), b))
    stats = reward_model.reward_statistics(lambda b: scorer_fn(state.params, b),
                                           data.Loader(pairs, batch_size=c.batch_size, shuffle=False, num_epochs=1))
    return RewardModelScorer(trained, stats), {"train_accuracy_last20": float(np.mean(accs[-20:]))}


def _state_of(model, params):
    """An nnx.State for `model`'s Params holding copies of the pure-dict `params`."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.unflatten(jax.tree.structure(state), models.copy_tree(jax.tree.leaves(params)))


def _policy_from(model, params):
    policy = models.clone_model(model)
    nnx.update(policy, _state_of(policy, params))
    return policy


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
    memory_batch: object = None  # () -> a batch of the train step's shape


def _optimizer(lr: float, steps: int):
    return training.make_optimizer(training.OptimConfig(lr=lr, schedule="constant", grad_clip_norm=1.0))


def setup_dpo(cfg, task, model, sft_params, pairs, *, rpo: bool) -> Run:
    c = cfg.dpo
    policy = _policy_from(model, sft_params)
    dcfg = dpo.DPOConfig(beta=c.beta, rpo_alpha=c.rpo_alpha if rpo else 0.0)
    ref_fn = dpo.make_reference_fn(_policy_from(model, sft_params))
    loader = data.Loader(pairs, batch_size=c.batch_size, seed=cfg.seed)
    table = dpo.precompute_reference(ref_fn, pairs, batch_size=c.batch_size)
    opt = _optimizer(c.lr, cfg.budget.steps)
    state, mdef = training.init_train_state(policy, opt, seed=cfg.seed)
    step = training.make_train_step(dpo.make_dpo_loss_fn(dcfg), opt, model_def=mdef,
                                    shardings=training.state_shardings(state))
    batches = (dpo.attach_reference(b, table=table) for b in loader)
    n = evaluation.count_params(sft_params)
    first = dpo.attach_reference(loader.batch_at(0, 0), table=table)
    return Run("DPO + NLL (RPO)" if rpo else "DPO", state, step, batches, lambda p: p,
               [("policy (reference log-probs precomputed)", n)], step, lambda: first)


def setup_ppo(cfg, task, model, sft_params, scorer, rm_params: int | None) -> Run:
    """PPO rewarded by `scorer`: the reward model (`rm_params` its size) or, with
    `rm_params=None`, the verifier (then no reward model is resident)."""
    c = cfg.ppo
    actor = _policy_from(model, sft_params)
    ac = ppo.ActorCritic(actor, shared=c.critic == "shared")
    pcfg = ppo.PPOConfig(prompts_per_step=cfg.budget.prompts_per_step, sampling=SamplingConfig(
        max_new_tokens=task.max_new_tokens), kl_coef=c.kl_coef, epochs=c.epochs, vf_coef=c.vf_coef,
        critic=c.critic)
    opt = _optimizer(c.lr, cfg.budget.steps)
    state, mdef = training.init_train_state(ac, opt, seed=cfg.seed)
    step = training.make_train_step(ppo.make_ppo_loss_fn(pcfg), opt, model_def=mdef,
                                    shardings=training.state_shardings(state))
    ps = ppo.PPOStep(pcfg, train_step=step, model=ac, reference=_policy_from(model, sft_params),
                     reward_fn=scorer, tokenizer=task.tokenizer, sampler=Sampler(ac.actor), seed=cfg.seed)
    n = evaluation.count_params(sft_params)
    critic = evaluation.count_params(state.params["critic"])
    resident = [("actor", n), ("critic", critic), ("reference", n)]
    resident += [("reward model", rm_params)] if rm_params is not None else []
    name = "PPO (reward model)" if rm_params is not None else "PPO (verifier)"
    return Run(name, state, ps, prompt_loader(cfg, task, seed=cfg.seed + 7, batch_size=pcfg.prompts_per_step),
               lambda p: p["actor"], resident, step, lambda: ps.last_batch)


def setup_group(cfg, task, model, sft_params, preset: str) -> Run:
    c = cfg.grpo
    policy = _policy_from(model, sft_params)
    gcfg = group.preset(preset, group_size=c.group_size, prompts_per_step=cfg.budget.prompts_per_step,
                        sampling=SamplingConfig(max_new_tokens=task.max_new_tokens))
    opt = _optimizer(c.lr, cfg.budget.steps)
    state, mdef = training.init_train_state(policy, opt, seed=cfg.seed)
    step = training.make_train_step(group.make_group_loss_fn(gcfg), opt, model_def=mdef,
                                    shardings=training.state_shardings(state))
    loader = prompt_loader(cfg, task, seed=cfg.seed + 7, batch_size=gcfg.prompts_per_step)
    ref = _policy_from(model, sft_params) if gcfg.beta > 0 else None
    gs = group.GroupStep(gcfg, train_step=step, sampler=Sampler(policy), reward_fn=task.reward_fn,
                         tokenizer=task.tokenizer, prompts=loader,
                         reference_params=sft_params if ref is not None else None, reference_model=ref,
                         seed=cfg.seed)
    n = evaluation.count_params(sft_params)
    resident = [("policy", n)] + ([("reference", n)] if ref is not None else [])
    name = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO"}[preset]
    return Run(name, state, gs, loader, lambda p: p, resident, step, lambda: gs.last_batch)


def execute(run: Run, cfg, evaluator: Evaluator) -> tuple[dict, list[dict]]:
    """Train `run` for the shared budget; evaluate every `eval.every` steps (eval time excluded)."""
    state = run.state
    curve = [{"step": 0, "time_s": 0.0, **evaluator(run.policy_params(state.params))}]
    before = curve[0]["accuracy"]
    train_time, step_times = 0.0, []
    bar = tqdm.tqdm(total=cfg.budget.steps, desc=run.name, dynamic_ncols=True)
    memory = None
    for i in range(1, cfg.budget.steps + 1):
        t0 = time.perf_counter()
        state, m = run.step_fn(state, next(run.batches))
        jax.block_until_ready(state.params)
        dt = time.perf_counter() - t0
        train_time += dt
        if i > 1:
            step_times.append(dt)  # the first step includes compilation
        if memory is None:
            memory = evaluation.step_memory_bytes(run.train_step, state, run.memory_batch())
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


ALGORITHMS = ("DPO", "DPO + NLL (RPO)", "PPO (reward model)", "PPO (verifier)", "GRPO", "Dr. GRPO", "DAPO")


def run_comparison(cfg, algorithms=ALGORITHMS):
    """The whole pipeline; returns (table rows, curves per algorithm)."""
    task = build_task(cfg)
    t0 = time.perf_counter()
    model, sft_params, sft_history = train_sft(cfg, task)
    sft_time = time.perf_counter() - t0
    evaluator = Evaluator(task, model, sft_params)
    pairs = label_pairs(cfg, task, model, sft_params)
    scorer, rm_info = train_reward_model(cfg, model, sft_params, pairs)
    # Checkpoints the per-algorithm configs (experiments/configs/*_arithmetic.py) start from.
    models.save_hf(model, os.path.join(cfg.workdir, "sft"), tokenizer=task.tokenizer)
    models.save_hf(nnx.merge(scorer.graphdef, scorer.state), os.path.join(cfg.workdir, "reward_model"),
                   tokenizer=task.tokenizer, extra_config={reward_model.NORM_KEY: {"mean": scorer.mean,
                                                                                  "std": scorer.std}})
    rm_params = evaluation.count_params(scorer.state)
    setups = {
        "DPO": lambda: setup_dpo(cfg, task, model, sft_params, pairs, rpo=False),
        "DPO + NLL (RPO)": lambda: setup_dpo(cfg, task, model, sft_params, pairs, rpo=True),
        "PPO (reward model)": lambda: setup_ppo(cfg, task, model, sft_params, scorer, rm_params),
        "PPO (verifier)": lambda: setup_ppo(cfg, task, model, sft_params, task.reward_fn, None),
        "GRPO": lambda: setup_group(cfg, task, model, sft_params, "grpo"),
        "Dr. GRPO": lambda: setup_group(cfg, task, model, sft_params, "dr_grpo"),
        "DAPO": lambda: setup_group(cfg, task, model, sft_params, "dapo"),
    }
    rows, curves = [], {"SFT": sft_history}
    for name in algorithms:
        row, curve = execute(setups[name](), cfg, evaluator)
        rows.append(row)
        curves[name] = curve
    meta = {"sft_steps": sft_history[-1]["step"], "sft_time_s": sft_time, "sft_accuracy": sft_history[-1]["accuracy"],
            "pairs": len(pairs), "reward_model": rm_info, "budget": dict(cfg.budget)}
    curves["_meta"] = meta
    return rows, curves


COLUMNS = [("algorithm", "algorithm"), ("models resident", "models_resident"),
           ("parameters resident", "params_resident"), ("peak step memory", "peak_bytes"),
           ("step time", "step_time_s"), ("held-out accuracy before → after", None), ("KL to SFT", "kl_to_ref")]


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["algorithm"], r["models_resident"], f"{r['params_resident']:,}", _fmt_bytes(r["peak_bytes"]),
                 f"{r['step_time_s'] * 1000:.0f} ms", f"{r['accuracy_before']:.1%} → {r['accuracy_after']:.1%}",
                 f"{r['kl_to_ref']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], curves: dict, out_dir: str) -> None:
    """results/comparison.{md,json}, curves.json and the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out_dir, "curves.json"), "w") as f:
        json.dump(curves, f, indent=2)
    meta = curves.get("_meta", {})
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
        if meta:
            f.write(f"\nSFT: {meta['sft_steps']} steps ({meta['sft_time_s']:.0f} s) to "
                    f"{meta['sft_accuracy']:.1%} held-out accuracy; {meta['pairs']} verifier-labelled pairs; "
                    f"reward model pair accuracy (train, last 20 steps) "
                    f"{meta['reward_model']['train_accuracy_last20']:.1%}; budget per algorithm: {meta['budget']}.\n")
    algos = [k for k in curves if k not in ("SFT", "_meta")]
    panels = [("accuracy", "step", "held-out accuracy"), ("accuracy", "time_s", "held-out accuracy"),
              ("kl_to_sft", "step", "KL to SFT (nats / completion)"), ("reward_mean", "step", "train reward"),
              ("response_length_mean", "step", "response length (tokens)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, x, label) in zip(axes, panels):
        for i, name in enumerate(algos):  # one colour per algorithm in every panel
            pts = [p for p in curves[name] if key in p]
            if pts:
                ax.plot([p[x] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name, color=f"C{i}")
        ax.set_xlabel("wall time of training (s)" if x == "time_s" else "step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "comparison.png"), dpi=90)
    plt.close(fig)
