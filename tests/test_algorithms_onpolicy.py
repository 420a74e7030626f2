"""The on-policy driver's registries, the new presets (GSPO, CISPO, RLOO, REINFORCE++), the
rollout/trainer mismatch correction, the config's refusals and docs/algorithms.md's worked example."""

import pathlib
import re

import jax
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.algorithms import config, onpolicy
from jaxalign.algorithms.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdvantageInputs
from tests.test_algorithms_online import SAMPLING, build, task, train  # noqa: F401 (the module fixture)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"


@pytest.mark.parametrize("preset", ["gspo", "cispo", "rloo", "reinforce_pp"])
def test_new_presets_take_steps_that_change_the_params(task, preset):  # noqa: F811
    run, loader = build(task, preset, lr=1e-2)
    before = jax.tree.map(np.array, run.state.params)
    state, hist = train(run, loader, 2)
    assert int(state.step) == 2
    assert all(np.isfinite(h["loss"]) and h["empty_batch"] == 0 for h in hist)
    assert "entropy" in hist[-1] and hist[-1]["mismatch_abs_max"] >= 0
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before),
                                                                  jax.tree.leaves(state.params))]
    assert all(moved)
    if preset == "reinforce_pp":  # β > 0 with the KL in the reward: a reference, and its KL logged
        assert np.isfinite(hist[-1]["kl_ref"]) and hist[-1]["beta"] == pytest.approx(0.01)
        assert "ref_logps" not in run.step.batch_like(next(loader)) and "kl" not in hist[-1]


def _arrays(seed=0, rows=8, n=5):
    rng = np.random.default_rng(seed)
    mask = (np.arange(n)[None] < rng.integers(1, n + 1, rows)[:, None]).astype(np.float32)
    old = rng.normal(-1.5, 0.3, (rows, n)).astype(np.float32)
    logps = (old + rng.normal(0, 0.2, (rows, n))).astype(np.float32)
    return logps, old, mask, rng.normal(size=rows).astype(np.float32)


@pytest.mark.parametrize("name, loss, keywords", [
    ("ppo_clip", lambda lp, o, a, m, **k: losses.grpo_loss(lp, o, None, a, m, **k),
     dict(clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0, agg="token-mean")),
    ("gspo", losses.gspo_loss, dict(clip_eps_low=3e-4, clip_eps_high=4e-4)),
    ("cispo", losses.cispo_loss, dict(eps_low=None, eps_high=0.28, agg="token-mean")),
])
def test_the_policy_loss_registry_calls_the_named_loss_with_the_config_keywords(name, loss, keywords):
    cfg = onpolicy.preset({"ppo_clip": "dapo", "gspo": "gspo", "cispo": "cispo"}[name])
    assert cfg.policy_loss == name
    logps, old, mask, adv = _arrays()
    batch = {"old_logps": old, "advantages": adv, "mask": mask}
    (num, den), _ = POLICY_LOSSES[name](logps, batch, cfg, None)
    want, _ = loss(logps, old, adv, mask, **keywords)
    np.testing.assert_allclose(float(num / den), float(want), rtol=1e-6)


def test_advantage_estimators_against_float64_references():
    g = 4
    rewards = np.array([0., 1., 1., 0., 2., 2., 2., 2., 0.5, 0., 1., 3.], np.float32)
    mask = np.ones((len(rewards), 3), np.float32)
    x = AdvantageInputs(rewards=rewards, mask=mask, group_size=g)
    r = rewards.astype(np.float64).reshape(-1, g)
    centred = r - r.mean(1, keepdims=True)
    std = r.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(ADVANTAGE_ESTIMATORS["group"](x, None), (centred / (std + 1e-6)).ravel(), atol=1e-5)
    np.testing.assert_allclose(ADVANTAGE_ESTIMATORS["none"](x, None), centred.ravel(), atol=1e-6)
    loo = r - (r.sum(1, keepdims=True) - r) / (g - 1)
    np.testing.assert_allclose(ADVANTAGE_ESTIMATORS["rloo"](x, None), loo.ravel(), atol=1e-6)
    pp = ADVANTAGE_ESTIMATORS["reinforce_pp"](x, None)  # the baseline form: centred in the group, batch std
    want = centred.ravel() / centred.ravel().std(ddof=1)
    np.testing.assert_allclose(pp, np.broadcast_to(want[:, None], mask.shape), atol=1e-5)

    # With the KL in the reward: r_t = −β·kl_t + [t = last]·(R − group mean), returns-to-go,
    # whitened over the batch's tokens.
    rng = np.random.default_rng(0)
    mask = (np.arange(3)[None] < rng.integers(1, 4, len(rewards))[:, None]).astype(np.float32)
    kl = (rng.uniform(0, 0.5, mask.shape) * mask).astype(np.float32)
    out = ADVANTAGE_ESTIMATORS["reinforce_pp"](AdvantageInputs(rewards, mask, g, beta=0.1, token_kl=kl), None)
    per_token = -0.1 * kl.astype(np.float64)
    last = mask.sum(1).astype(int) - 1
    per_token[np.arange(len(last)), last] += centred.ravel()
    to_go = np.cumsum(per_token[:, ::-1], axis=1)[:, ::-1] * mask
    valid = mask > 0
    mean, var = to_go[valid].mean(), to_go[valid].var()
    want = np.where(valid, (to_go - mean) / np.sqrt(var + 1e-8), 0.0)
    np.testing.assert_allclose(np.where(valid, out, 0.0), want, atol=1e-5)
    assert not np.allclose(out[valid], np.repeat(out[:, 0], mask.sum(1).astype(int)))  # varies along a row


def _docs_example() -> str:
    text = DOCS.read_text()
    section = text.split("## Add an algorithm", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_worked_example_adds_an_estimator_the_driver_uses(task):  # noqa: F811
    """docs/algorithms.md's example, executed: its estimator is registered by the decorator,
    checked on hand-computed values, and used by the driver to build the training batch."""
    namespace = {}
    exec(compile(_docs_example(), str(DOCS), "exec"), namespace)
    try:
        estimator = ADVANTAGE_ESTIMATORS["group_rank"]
        x = AdvantageInputs(rewards=np.array([0.1, 0.5, 0.5, 0.9, 1., 1., 1., 1.], np.float32),
                            mask=np.ones((8, 2), np.float32), group_size=4)
        np.testing.assert_allclose(estimator(x, None), [-1, 0, 0, 1, 0, 0, 0, 0], atol=1e-7)
        assert namespace["cfg"].advantage == "group_rank"

        seen = []

        def rewards(rollout):
            seen.append(np.array([c.count("7") / max(len(c), 1) for c in rollout.completions], np.float32))
            return seen[-1]

        run, loader = build(task, "dapo", advantage="group_rank", reward_fn=rewards, dynamic_sampling=False,
                            overlong_filter=False)
        batch, _ = run.step.rollout(run.state.params, next(loader), 0)
        want = estimator(AdvantageInputs(rewards=seen[-1], mask=batch["mask"], group_size=4), None)
        np.testing.assert_array_equal(batch["advantages"], want)
        assert np.abs(want).max() > 0  # the tiny model's rewards differ within some group
    finally:
        ADVANTAGE_ESTIMATORS.pop("group_rank", None)


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_importance_weights_are_exactly_one_when_sampler_and_trainer_run_the_same_float32_program(
        task, correction):  # noqa: F811
    """The driver keeps the sampler's log-probs next to its own recomputation. The float32 sampler
    (a KV-cached decode) differs from the teacher-forced trainer only by float rounding; a sampler
    whose log-probs come from the trainer's own program gives exactly zero mismatch, `tis`
    weights exactly 1 and a `mis` mask that drops nothing (so the columns, the temperature and
    the masks of the two line up exactly)."""
    import dataclasses

    import jax.numpy as jnp

    run, loader = build(task, "dapo", is_correction=correction, is_cap=1.5, dynamic_sampling=False,
                        overlong_filter=False)
    step, n = run.step, SAMPLING.max_new_tokens
    batch, metrics = step.rollout(run.state.params, next(loader), 0)
    assert 0.0 <= metrics["mismatch_abs_max"] < 1e-5 and metrics["is_masked_frac"] == 0.0
    sampler = step.sampler

    def same_program_sampler(params, *args, **kwargs):
        result = sampler(params, *args, **kwargs)
        tokens, mask = result.sequences()
        loss_mask = jnp.concatenate([jnp.zeros_like(result.prompt_mask), result.mask], axis=1)
        logps = step.old_logps(params, {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}, last=n)
        return dataclasses.replace(result, logprobs=jnp.where(result.mask > 0, logps, 0.0))

    step.sampler = same_program_sampler
    batch, metrics = step.rollout(run.state.params, next(loader), 1)
    assert metrics["mismatch_abs_max"] == 0.0 and metrics["mismatch_kl_k3"] == 0.0
    assert metrics["is_masked_frac"] == 0.0 and metrics["is_weight_mean"] == 1.0
    completion = batch["attention_mask"][:, -n:]  # the generated tokens
    np.testing.assert_array_equal(batch["mask"], completion.astype(np.float32))
    if correction == "tis":
        np.testing.assert_array_equal(batch["is_weights"], batch["mask"])  # 1 on every token, 0 off the mask
    else:
        assert "is_weights" not in batch


@pytest.mark.parametrize("overrides, message", [
    (dict(advantage="gae", policy_loss="gspo", beta=0.0, agg="token-mean"), "one advantage per sequence"),
    (dict(policy_loss="gspo", beta=0.04), "has no KL term"),
    (dict(clip_eps_low=None), "CISPO's"),
    (dict(advantage="gae", agg="seq-mean-token-mean"), "agg must be 'token-mean'"),
    (dict(advantage="vtrace"), "algorithm.advantage='vtrace'; valid:"),
    (dict(is_correction="ppo"), "algorithm.is_correction='ppo'; valid:"),
    (dict(mu=0), "algorithm.mu=0 must be >= 1"),
    (dict(kl_target=6.0), "needs kl_in_reward=True"),
    (dict(is_correction="tis", is_cap=0.5), "algorithm.is_cap=0.5 must be >= 1"),
    (dict(prompts_per_step=3, group_size=2, minibatches=4), "minibatches=4 does not divide the 6 rows"),
    (dict(clip_eps=0.2), "unknown algorithm field"),
])
def test_the_config_refuses_what_cannot_run_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        onpolicy.preset("grpo", **overrides)
    assert "\n" not in str(e.value)


def test_presets_are_rows_of_one_table_and_unknown_names_are_refused():
    assert sorted(onpolicy.PRESETS) == sorted(["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp",
                                               "ppo"])
    for name in onpolicy.PRESETS:
        cfg = onpolicy.preset(name)
        assert cfg.advantage in ADVANTAGE_ESTIMATORS and cfg.policy_loss in POLICY_LOSSES
        assert f"| {name} " in config.__doc__  # the module's table has the row
    with pytest.raises(ValueError, match="unknown preset 'grpo2'; valid:"):
        onpolicy.preset("grpo2")
    assert onpolicy.preset("ppo").uses_critic and not onpolicy.preset("grpo").uses_critic
    assert not onpolicy.preset("dapo").needs_reference and onpolicy.preset("grpo").needs_reference
