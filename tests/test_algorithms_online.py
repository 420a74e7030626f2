"""The on-policy driver end to end at a tiny size, on the built-in task's tokenizer: GRPO, Dr. GRPO,
DAPO and PPO (the new presets and the registries: tests/test_algorithms_onpolicy.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import data, models, training
from jaxalign.algorithms import onpolicy
from jaxalign.algorithms.rollout import SamplingConfig
from jaxalign.tasks import arithmetic

SAMPLING = SamplingConfig(max_new_tokens=4)


def sevens(rollout):
    """A reward a tiny model learns in a few steps: the share of '7' characters."""
    return np.array([c.count("7") / max(len(c), 1) for c in rollout.completions], np.float32)


@pytest.fixture(scope="module")
def task():
    tok = arithmetic.load_tokenizer()
    problems = arithmetic.sample_problems(np.random.default_rng(0), 256)
    records = [{"prompt": p, "answer": a} for p, a in zip(problems.prompts, problems.answers)]
    prompts = data.tokenize_prompts(records, tok, max_length=8)
    cfg = models.tiny_config("llama", vocab_size=len(tok), max_position_embeddings=32)
    return tok, prompts, cfg


def build(task, preset, *, reward_fn=sevens, lr=3e-3, seed=0, **over):
    """A built run of `preset` on the tiny model, and its prompt loader."""
    tok, prompts, cfg = task
    model = models.Transformer(cfg, rngs=nnx.Rngs(seed))
    acfg = onpolicy.preset(preset, **{"group_size": 4, "prompts_per_step": 4, **over})
    opt = training.make_optimizer(training.OptimConfig(lr=lr, schedule="constant"))
    loader = data.Loader(prompts, batch_size=acfg.prompts_per_step, seed=seed, buckets=(8,))
    run = onpolicy.build(acfg, SAMPLING, model, tokenizer=tok, reward_fn=reward_fn, prompts=loader, optimizer=opt,
                         seed=seed)
    return run, loader


def train(run, loader, steps):
    state, history = run.state, []
    for _ in range(steps):
        state, m = run.step(state, next(loader))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo"])
def test_group_presets_raise_their_reward(task, preset):
    _, hist = train(*build(task, preset), 16)
    first = np.mean([h["reward_mean"] for h in hist[:4]])
    last = np.mean([h["reward_mean"] for h in hist[-4:]])
    assert last > first + 0.15, (first, last)


def _first_step(task, preset):
    """One step, watched from outside: the train step is compiled (`compiled`) before the sampler
    runs, for the layout `batch_like` gives, and the step then runs on a batch of that layout."""
    run, loader = build(task, preset)
    step, events = run.step, []
    train_step, sampler = step.train_step, step.sampler

    class Watched:
        nan_policy = train_step.nan_policy

        def compiled(self, state, batch):
            events.append(("compile", {k: (v.shape, v.dtype) for k, v in batch.items()}))
            return train_step.compiled(state, batch)

        def __call__(self, state, batch):
            events.append(("step", {k: (v.shape, v.dtype) for k, v in batch.items()}))
            return train_step(state, batch)

    def watched_sampler(*args, **kwargs):
        events.append(("sample", None))
        return sampler(*args, **kwargs)

    step.train_step, step.sampler = Watched(), watched_sampler
    prompt_batch = next(loader)
    state, metrics = step(run.state, prompt_batch)
    kinds = [e[0] for e in events]
    assert kinds[0] == "compile" and kinds[1] == "sample" and kinds.count("compile") == 1, kinds
    like = {k: (v.shape, v.dtype) for k, v in step.batch_like(prompt_batch).items()}
    assert events[0][1] == like and events[-1] == ("step", like)
    return {k: float(v) for k, v in metrics.items()}, like


def test_steps_compile_before_the_rollout_and_only_grpo_builds_a_reference(task):
    metrics, like = _first_step(task, "dapo")
    assert "ref_logps" not in like and "kl" not in metrics
    metrics, like = _first_step(task, "grpo")
    assert "ref_logps" in like and metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_dynamic_sampling_refills_the_batch(task):
    """Prompts with an even first operand are always right (their groups carry no signal);
    the others get rewards that differ within the group."""

    def half_solved(rollout):
        even = np.array([int(p.split("+")[0]) % 2 == 0 for p in rollout.prompts])
        alternating = np.arange(len(even)) % 2
        return np.where(even, 1.0, alternating).astype(np.float32)

    run, loader = build(task, "dapo", reward_fn=half_solved, overlong_filter=False, max_sampling_rounds=16)
    state = run.state
    for step in range(3):
        batch, m = run.step.rollout(state.params, next(loader), step)
        assert m["groups_kept"] == 4 and m["groups_drawn"] > 4
        adv = batch["advantages"].reshape(4, 4)
        assert (np.abs(adv).max(1) > 0).all()  # every kept group is informative
        assert (batch["mask"].sum(1) > 0).all()  # and every row trains


def test_an_empty_batch_makes_no_update_and_says_so(task):
    """Dynamic sampling finds no informative group within its rounds: no rows are duplicated,
    the step makes no update (not even one the NaN guard drops) and logs `empty_batch`."""
    drawn = []

    def all_right(rollout):
        drawn.append(rollout.completions)
        return np.ones(len(rollout.completions), np.float32)

    run, loader = build(task, "dapo", reward_fn=all_right, max_sampling_rounds=2)
    before = jax.tree.map(np.array, run.state.params)
    state, hist = train(run, loader, 1)
    assert hist[0]["groups_drawn"] == 8 and hist[0]["groups_kept"] == 0
    assert hist[0]["empty_batch"] == 1 and "loss" not in hist[0] and "skipped_steps" not in hist[0]
    assert int(state.step) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert hist[0]["finite"] == 1  # what the loop's NaN check reads: nothing non-finite happened
    # `state.step` did not move, yet the next step samples with a new key: the same prompts twice
    # give different completions.
    prompt_batch = next(loader)
    for _ in range(2):
        state, m = run.step(state, prompt_batch)
        assert m["empty_batch"] == 1
    assert drawn[-2] != drawn[-4]


def test_same_seed_same_results(task):
    s1, h1 = train(*build(task, "grpo"), 2)
    s2, h2 = train(*build(task, "grpo"), 2)
    assert h1[-1]["loss"] == h2[-1]["loss"] and h1[-1]["reward_mean"] == h2[-1]["reward_mean"]
    np.testing.assert_array_equal(np.asarray(s1.params["embed"]), np.asarray(s2.params["embed"]))
    _, h3 = train(*build(task, "grpo", seed=1), 2)
    assert h3[-1]["loss"] != h1[-1]["loss"]


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_learns_value_and_reward(task, critic):
    """12 PPO steps on the '7' reward: the reward rises, and the critic learns to predict it.

    The critic is judged on the last step's rollout, the one it was trained on last, against
    each row's own score (with gamma = 1 and a small KL coefficient, the value of every
    completion token is close to the row's final score): the trained critic must err far
    less than the initial one. The per-step value loss is no measure of this, since its
    targets move with the policy (they are near zero while the reward is).
    """
    last = {}

    def recorded_sevens(rollout):
        last["scores"] = sevens(rollout)
        return last["scores"]

    run, loader = build(task, "ppo", reward_fn=recorded_sevens, group_size=1, prompts_per_step=16, beta=0.01,
                        mu=2, minibatches=2, vf_coef=0.5, critic=critic)
    step = run.step
    rollout = step.rollout

    def recorded_rollout(*args):
        last["batch"], metrics = rollout(*args)
        return last["batch"], metrics

    step.rollout = recorded_rollout
    initial_critic = jax.tree.map(np.array, step.critic_params(run.state.params))  # a copy: the step donates
    state, hist = train(run, loader, 12)
    assert np.mean([h["reward_mean"] for h in hist[-3:]]) > np.mean([h["reward_mean"] for h in hist[:3]]) + 0.1
    assert hist[-1]["kl_ref"] > 0  # the policy moved away from the reference
    if critic == "shared":
        assert set(state.params["critic"]) == {"head"}

    batch = last["batch"]
    mask = batch["mask"].astype(np.float64)
    target = last["scores"][:, None].astype(np.float64)  # rows in rollout order, as in the batch
    n = SAMPLING.max_new_tokens

    def critic_error(params):
        values = np.asarray(step.values(params, batch["tokens"], batch["attention_mask"]), np.float64)[:, -n:]
        return float((np.square(values - target) * mask).sum() / mask.sum())

    before, after = critic_error(initial_critic), critic_error(step.critic_params(state.params))
    assert after < 0.25 * before, (before, after)


def test_completion_only_scoring_equals_the_full_width_loss(task):
    """The loss scores only the N completion columns (`last=N` from the sampling config); its value
    and gradient equal a full-width computation (every logit, then the last N columns) written here."""
    import jax.numpy as jnp

    from jaxalign.algorithms.common import model_logits
    from jaxalign.algorithms.rollout import make_logprob_fn
    from jaxalign.losses import grpo_loss, token_logprobs

    run, loader = build(task, "grpo")
    batch, _ = run.step.rollout(run.state.params, next(loader), 0)
    t, n = batch["tokens"].shape[1], batch["old_logps"].shape[1]
    assert n == SAMPLING.max_new_tokens < t - 1  # trimmed to the completion
    _, _, cfg = task
    model = models.Transformer(cfg, rngs=nnx.Rngs(3))
    acfg = onpolicy.preset("grpo", group_size=4, prompts_per_step=4)
    loss_fn = onpolicy.make_loss_fn(acfg, SAMPLING)
    b = {k: jnp.asarray(v) for k, v in batch.items()}

    def trimmed(params):
        (num, den), _ = loss_fn(nnx.merge(nnx.graphdef(model), params), b, None)
        return num / den

    def full_width(params):
        m = nnx.merge(nnx.graphdef(model), params)
        logps = token_logprobs(model_logits(m, b)[:, :-1], b["tokens"][:, 1:])[:, -n:]
        return grpo_loss(logps, b["old_logps"], b["ref_logps"], b["advantages"], b["mask"], beta=acfg.beta,
                         kl=acfg.kl, agg=acfg.agg)[0]

    params = nnx.state(model, nnx.Param)
    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params) for f in (trimmed, full_width))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6, atol=1e-7)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)
    fn = make_logprob_fn(model)
    np.testing.assert_allclose(np.asarray(fn(params, batch | {"loss_mask": batch["attention_mask"]}, last=n)),
                               np.asarray(fn(params, batch | {"loss_mask": batch["attention_mask"]}))[:, -n:],
                               rtol=1e-6, atol=1e-6)
