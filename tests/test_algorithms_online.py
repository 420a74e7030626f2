"""PPO and the GRPO family end to end at a tiny size, on the built-in task's tokenizer."""

import numpy as np
import pytest
from flax import nnx

from jaxalign import data, models, training
from jaxalign.algorithms import group, ppo
from jaxalign.algorithms.rollout import SamplingConfig
from jaxalign.sampling import Sampler
from jaxalign.tasks import arithmetic

SEVEN = 2 + 7  # token id of "7"


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


def _loader(prompts, batch_size, seed=0):
    return data.Loader(prompts, batch_size=batch_size, seed=seed, buckets=(8,))


def _group_run(task, preset, steps, *, reward_fn=sevens, lr=3e-3, seed=0, **over):
    tok, prompts, cfg = task
    model = models.Transformer(cfg, rngs=nnx.Rngs(seed))
    ref = models.Transformer(cfg, rngs=nnx.Rngs(seed))
    gcfg = group.preset(preset, **{"group_size": 4, "prompts_per_step": 4,
                                   "sampling": SamplingConfig(max_new_tokens=4), **over})
    opt = training.make_optimizer(training.OptimConfig(lr=lr, schedule="constant"))
    state, mdef = training.init_train_state(model, opt, seed=seed)
    step = training.make_train_step(group.make_group_loss_fn(gcfg), opt, model_def=mdef,
                                    shardings=training.state_shardings(state))
    loader = _loader(prompts, gcfg.prompts_per_step, seed)
    ref_params = nnx.to_pure_dict(nnx.state(ref, nnx.Param)) if gcfg.beta > 0 else None
    gs = group.GroupStep(gcfg, train_step=step, sampler=Sampler(model), reward_fn=reward_fn, tokenizer=tok,
                         prompts=loader, reference_params=ref_params, reference_model=ref if ref_params else None,
                         seed=seed)
    history = []
    for _ in range(steps):
        state, m = gs(state, next(loader))
        history.append({k: float(v) for k, v in m.items()})
    return gs, state, history


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo"])
def test_group_presets_raise_their_reward(task, preset):
    _, _, hist = _group_run(task, preset, 16)
    first = np.mean([h["reward_mean"] for h in hist[:4]])
    last = np.mean([h["reward_mean"] for h in hist[-4:]])
    assert last > first + 0.15, (first, last)


def _first_step_compiling_before_the_rollout(task, preset):
    """One GroupStep call; asserts the train step was compiled before the rollout sampled, for the
    layout the rollout then built (`batch_like`), and that the step ran that program (no second one)."""
    gs, state, _ = _group_run(task, preset, 0)
    programs_at_sampling, sampler = [], gs.sampler

    def spy(*args, **kwargs):
        programs_at_sampling.append(len(gs.train_step._executables))
        return sampler(*args, **kwargs)

    gs.sampler = spy
    prompt_batch = next(gs.prompts)
    state, metrics = gs(state, prompt_batch)
    assert programs_at_sampling[0] == 1 and len(gs.train_step._executables) == 1
    like = gs.batch_like(prompt_batch)
    assert {k: (v.shape, v.dtype) for k, v in like.items()} == \
        {k: (v.shape, v.dtype) for k, v in gs.last_batch.items()}
    return gs, {k: float(v) for k, v in metrics.items()}


def test_group_steps_compile_before_the_rollout_and_only_grpo_builds_a_reference(task):
    gs, metrics = _first_step_compiling_before_the_rollout(task, "dapo")
    assert gs.ref_logps is None and "ref_logps" not in gs.last_batch and "kl" not in metrics
    gs, metrics = _first_step_compiling_before_the_rollout(task, "grpo")
    assert "ref_logps" in gs.last_batch and metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_dynamic_sampling_refills_the_batch(task):
    """Prompts with an even first operand are always right (their groups carry no signal);
    the others get rewards that differ within the group."""

    def half_solved(rollout):
        even = np.array([int(p.split("+")[0]) % 2 == 0 for p in rollout.prompts])
        alternating = np.arange(len(even)) % 2
        return np.where(even, 1.0, alternating).astype(np.float32)

    gs, _, hist = _group_run(task, "dapo", 3, reward_fn=half_solved, overlong_filter=False,
                             max_sampling_rounds=16)
    for h in hist:
        assert h["groups_kept"] == 4 and h["groups_drawn"] > 4
    batch = gs.last_batch
    adv = batch["advantages"].reshape(4, 4)
    assert (np.abs(adv).max(1) > 0).all()  # every kept group is informative
    assert (batch["weights"] == 1).all()


def test_dynamic_sampling_gives_up_after_max_rounds_without_duplicating(task):
    gs, _, hist = _group_run(task, "dapo", 1, reward_fn=lambda r: np.ones(len(r.completions), np.float32),
                             max_sampling_rounds=2)
    assert hist[0]["groups_drawn"] == 8 and hist[0]["groups_kept"] == 0
    assert (gs.last_batch["weights"] == 0).all()  # all rows masked out, the update is a no-op
    assert hist[0]["skipped_steps"] == 1  # 0/0 loss: the NaN guard drops the update


def test_same_seed_same_results(task):
    _, s1, h1 = _group_run(task, "grpo", 2)
    _, s2, h2 = _group_run(task, "grpo", 2)
    assert h1[-1]["loss"] == h2[-1]["loss"] and h1[-1]["reward_mean"] == h2[-1]["reward_mean"]
    np.testing.assert_array_equal(np.asarray(s1.params["embed"]), np.asarray(s2.params["embed"]))
    _, _, h3 = _group_run(task, "grpo", 2, seed=1)
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
    import jax

    tok, prompts, cfg = task
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    ref = models.Transformer(cfg, rngs=nnx.Rngs(0))
    ac = ppo.ActorCritic(model, shared=critic == "shared")
    pcfg = ppo.PPOConfig(prompts_per_step=16, sampling=SamplingConfig(max_new_tokens=4), kl_coef=0.01,
                         epochs=2, minibatches=2, vf_coef=0.5, critic=critic)
    opt = training.make_optimizer(training.OptimConfig(lr=3e-3, schedule="constant"))
    state, mdef = training.init_train_state(ac, opt)
    step = training.make_train_step(ppo.make_ppo_loss_fn(pcfg), opt, model_def=mdef,
                                    shardings=training.state_shardings(state))
    last = {}

    def recorded_sevens(rollout):
        last["scores"] = sevens(rollout)
        return last["scores"]

    ps = ppo.PPOStep(pcfg, train_step=step, model=ac, reference=ref, reward_fn=recorded_sevens, tokenizer=tok,
                     sampler=Sampler(ac.actor))

    def recorded_rollout(*args):
        last["batch"], metrics = rollout(*args)
        return last["batch"], metrics

    rollout, ps.rollout = ps.rollout, recorded_rollout
    initial_critic = jax.tree.map(np.array, ps._critic_params(state.params))  # a copy: the step donates
    loader = _loader(prompts, 16)
    hist = []
    for _ in range(12):
        state, m = ps(state, next(loader))
        hist.append({k: float(v) for k, v in m.items()})
    assert np.mean([h["reward_mean"] for h in hist[-3:]]) > np.mean([h["reward_mean"] for h in hist[:3]]) + 0.1
    assert hist[-1]["kl_ref"] > 0  # the policy moved away from the reference
    if critic == "shared":
        assert set(state.params["critic"]) == {"head"}

    batch = last["batch"]
    mask = batch["loss_mask"][:, 1:].astype(np.float64)
    target = last["scores"][:, None].astype(np.float64)  # rows in rollout order, as in the batch

    def critic_error(params):
        values = np.asarray(ps.values(params, batch["tokens"], batch["attention_mask"]), np.float64)
        return float((np.square(values - target) * mask).sum() / mask.sum())

    before, after = critic_error(initial_critic), critic_error(ps._critic_params(state.params))
    assert after < 0.25 * before, (before, after)


def test_completion_only_scoring_equals_the_full_width_loss(task):
    """GroupStep scores only the completion columns; the loss and its gradient equal the full-width ones."""
    import jax
    import jax.numpy as jnp

    from jaxalign.algorithms.rollout import make_logprob_fn

    gs, state, _ = _group_run(task, "grpo", 1)
    batch = gs.last_batch
    t, n = batch["tokens"].shape[1], batch["old_logps"].shape[1]
    assert n < t - 1  # trimmed to the completion
    full = dict(batch)
    for k in ("old_logps", "ref_logps"):
        full[k] = np.concatenate([np.zeros((len(batch[k]), t - 1 - n), np.float32), batch[k]], axis=1)
    _, _, cfg = task
    model = models.Transformer(cfg, rngs=nnx.Rngs(3))
    loss_fn = group.make_group_loss_fn(group.preset("grpo", group_size=4, prompts_per_step=4,
                                                    sampling=SamplingConfig(max_new_tokens=4)))

    def loss(params, b):
        m = nnx.merge(nnx.graphdef(model), params)
        (num, den), _ = loss_fn(m, {k: jnp.asarray(v) for k, v in b.items()}, None)
        return num / den

    params = nnx.state(model, nnx.Param)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    (l1, g1), (l2, g2) = (value_and_grad(params, b) for b in (batch, full))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    fn = make_logprob_fn(model)
    np.testing.assert_allclose(np.asarray(fn(params, batch, last=n)), np.asarray(fn(params, batch))[:, -n:],
                               rtol=1e-6, atol=1e-6)
