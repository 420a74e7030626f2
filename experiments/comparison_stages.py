"""The built-in comparison's stages before RL: the task, SFT, labelled pairs, the reward model.

SFT a tiny Llama on reversed-digit addition for a fixed number of steps ->
sample answers and label (correct, wrong) pairs with the verifier, the
stand-in for human raters -> train a Bradley–Terry reward model. The runs
that start from these (`experiments/comparison.py`) are measured by
`Evaluator`: held-out greedy accuracy and KL to the SFT policy. How these
stages were made machine-independent is in docs/comparison-recipe.md.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import tqdm
from flax import nnx

from jaxalign import data, models, training
from jaxalign.algorithms import evaluation, reward_model, sft
from jaxalign.algorithms.common import PairStep, response_logprobs
from jaxalign.algorithms.rollout import SamplingConfig
from jaxalign.losses import bradley_terry_loss
from jaxalign.rewards import exact_match, from_verifier
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
    """SFT for exactly `sft.steps` steps: AdamW, linear warm-up, cosine decay to 0 at the last step.

    A fixed step, not a threshold, so every machine starts RL from an equally
    trained model; the decay to 0 lets the weights settle, so the accuracy at
    that step moves little with the seed or the CPU's rounding. Half the
    demonstrations have sparse operands, every digit 0 with probability 1/2
    (`arithmetic.sample_problems(digits="mixed")`, why there). Returns
    (model, params, history): held-out greedy accuracy every `eval_every`
    steps and at the last.
    """
    c = cfg.sft
    tok = task.tokenizer
    problems = arithmetic.sample_problems(np.random.default_rng(cfg.seed), c.train_problems, digits="mixed")
    records = [{"prompt": p, "completion": a} for p, a in zip(problems.prompts, problems.answers)]
    sft_data = data.tokenize_sft(records, tok, max_length=arithmetic.max_prompt_len() + arithmetic.max_answer_len())
    loader = data.Loader(sft_data, batch_size=c.batch_size, seed=cfg.seed)
    model = new_model(cfg.model, len(tok), cfg.seed)
    opt = training.make_optimizer(training.OptimConfig(lr=c.lr, schedule="cosine", warmup_steps=c.warmup_steps,
                                                       total_steps=c.steps, grad_clip_norm=1.0))
    state, mdef = training.init_train_state(model, opt, seed=cfg.seed)
    step = training.make_train_step(sft.sft_loss_fn, opt, model_def=mdef, shardings=training.state_shardings(state))
    sampler = Sampler(model)
    history = []
    bar = tqdm.tqdm(total=c.steps, desc="SFT", dynamic_ncols=True)
    for i in range(1, c.steps + 1):
        state, m = step(state, next(loader))
        bar.update(1)
        if i % c.eval_every == 0 or i == c.steps:
            acc = evaluation.greedy_score(sampler, state.params, task.heldout, task.reward_fn, tok,
                                          max_new_tokens=task.max_new_tokens)
            history.append({"step": i, "loss": float(m["loss"]), "accuracy": acc})
            bar.set_postfix(loss=f"{float(m['loss']):.3f}", acc=f"{acc:.3f}")
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
                  eos_ids=(task.tokenizer.eos_token_id,), pad_id=task.tokenizer.pad_token_id,
                  rng=jax.random.PRNGKey(seed), tokenizer=task.tokenizer)


def train_reward_model(cfg, model, params, pairs) -> tuple[LikelihoodRewardModel, dict]:
    """A Bradley–Terry reward model whose reward is the answer's log-likelihood under an LM.

    r(x, y) = Σ_t log π_φ(y_t | x, y_<t), φ initialised from the SFT weights,
    trained with L = −log σ(r(x, y_w) − r(x, y_l)) (Bradley & Terry 1952; the
    sequence-likelihood parameterisation that DPO's implicit reward also has,
    here with β = 1 and no reference). A scalar head on the last token (the
    classic RM) stays near chance on these pairs at this budget: a pair
    differs in one digit, and telling which is right means redoing the sum
    from features no single token carries; the LM already predicts every
    answer digit (docs/comparison-recipe.md).

    The last `reward_model.heldout_pairs` pairs are held out (cut at a prompt
    boundary: `label_pairs` keeps each prompt's pairs together), so the model
    never trains on them or on their prompts. Returns the reward model and its
    pair accuracies P[r(chosen) > r(rejected)] on the held-out and the
    training pairs (`heldout_pair_accuracy`, `train_pair_accuracy`), with counts.
    """
    c = cfg.reward_model
    train, heldout = _split_pairs(pairs, c.heldout_pairs)
    opt = training.make_optimizer(training.OptimConfig(lr=c.lr, schedule="cosine", warmup_steps=c.warmup_steps,
                                                       total_steps=c.steps))
    state, mdef = training.init_train_state(policy_from(model, params), opt, seed=cfg.seed)
    step = PairStep(training.make_train_step(_likelihood_bt_loss, opt, model_def=mdef,
                                             shardings=training.state_shardings(state)), last=False)
    loader = data.Loader(train, batch_size=c.batch_size, seed=cfg.seed)
    for _ in tqdm.trange(c.steps, desc="reward model", dynamic_ncols=True):
        state, _ = step(state, next(loader))
    score = jax.jit(lambda p, b: _pair_likelihoods(mdef.merge(p), b))
    stats = reward_model.reward_statistics(lambda b: score(state.params, b),
                                           data.Loader(train, batch_size=c.batch_size, shuffle=False, num_epochs=1))

    def accuracy(subset) -> float:  # one batch of every pair (a Loader drops a partial last batch)
        chosen, rejected = score(state.params, next(data.Loader(subset, batch_size=len(subset), shuffle=False)))
        return float(np.mean(np.asarray(chosen) > np.asarray(rejected)))

    rm = LikelihoodRewardModel(mdef.merge(state.params), stats, completion_width=cfg.max_new_tokens)
    return rm, {"heldout_pair_accuracy": accuracy(heldout), "train_pair_accuracy": accuracy(train),
                "heldout_pairs": len(heldout), "train_pairs": len(train)}


def _pair_likelihoods(model, batch: dict):
    """Summed response log-probs (EOS included) of the chosen and the rejected sequences: two `[B]` arrays."""
    out = []
    for prefix in ("chosen_", "rejected_"):
        logps, mask = response_logprobs(model, batch, prefix=prefix)
        out.append((logps * mask).sum(1))
    return out[0], out[1]


def _likelihood_bt_loss(model, batch: dict, rng: jax.Array):
    del rng
    chosen, rejected = _pair_likelihoods(model, batch)
    return bradley_terry_loss(chosen, rejected, return_parts=True)


class LikelihoodRewardModel:
    """A reward function: (log π_φ(completion | prompt) − mean) / std, the scores normalised as
    `RewardModelScorer`'s are (Ziegler et al. 2019), with the same `graphdef`, `state`, `mean`, `std`.

    Rollout tokens are `[prompt ; completion]`; the completion is the last
    `completion_width` columns (the sampler's `max_new_tokens`), EOS included.
    """

    def __init__(self, model, normalization: dict, *, completion_width: int):
        self.graphdef, self.state = nnx.split(model)
        self.mean, self.std = float(normalization["mean"]), float(normalization["std"])
        self.width = completion_width

        @jax.jit
        def score(state, batch):
            logps, mask = response_logprobs(nnx.merge(self.graphdef, state), batch, last=completion_width)
            return (logps * mask).sum(1)

        self._score = score

    def __call__(self, rollout) -> np.ndarray:
        tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
        if tokens.shape[1] <= self.width:
            raise ValueError(f"rollout tokens {tokens.shape} leave no prompt before {self.width} completion columns")
        loss_mask = mask.copy()
        loss_mask[:, :-self.width] = 0
        batch = {"tokens": tokens, "attention_mask": mask, "positions": data.positions_from_mask(mask),
                 "loss_mask": loss_mask}
        return (np.asarray(self._score(self.state, batch), np.float32) - self.mean) / self.std


def _split_pairs(pairs: data.PreferenceData, heldout: int) -> tuple[data.PreferenceData, data.PreferenceData]:
    """(train, held-out): about the last `heldout` pairs, moved back to the first pair of their prompt."""
    if not 0 < heldout < len(pairs):
        raise ValueError(f"reward_model.heldout_pairs = {heldout} must be in (0, {len(pairs)}), the labelled pairs")
    prompt = lambda i: tuple(pairs.chosen[i][:pairs.prompt_lengths[i]])  # noqa: E731
    cut = len(pairs) - heldout
    while cut > 0 and prompt(cut - 1) == prompt(cut):
        cut -= 1
    if cut == 0:
        raise ValueError("reward_model: every labelled pair shares one prompt, nothing left to hold out")

    def part(idx):
        return dataclasses.replace(pairs, chosen=[pairs.chosen[i] for i in idx],
                                   rejected=[pairs.rejected[i] for i in idx],
                                   prompt_lengths=pairs.prompt_lengths[idx], index=pairs.index[idx])

    return part(np.arange(cut)), part(np.arange(cut, len(pairs)))


def _state_of(model, params):
    """An nnx.State for `model`'s Params holding copies of the pure-dict `params`."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.unflatten(jax.tree.structure(state), models.copy_tree(jax.tree.leaves(params)))


def policy_from(model, params):
    """A copy of `model` holding copies of the pure-dict `params` (the SFT weights each run starts from)."""
    policy = models.clone_model(model)
    nnx.update(policy, _state_of(policy, params))
    return policy
