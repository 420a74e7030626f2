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

import jax
import numpy as np
import tqdm
from flax import nnx

from jaxalign import data, models, training
from jaxalign.algorithms import evaluation, reward_model, sft
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
