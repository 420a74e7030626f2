"""Group advantages, GRPO / Dr. GRPO / DAPO, dynamic sampling, overlong penalty."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import (
    AGGREGATIONS,
    dapo_loss,
    dynamic_sampling_mask,
    group_advantages,
    grpo_loss,
    overlong_penalty,
)
from tests.test_losses_aggregation import ref_aggregate
from tests.test_losses_common import B, RTOL32, T, check_grad, right_padded_mask
from tests.test_losses_kl import ref_kl
from tests.test_losses_ppo import ref_policy_per_token

G = 4
MODES = sorted(AGGREGATIONS)


def ref_group_advantages(rewards, group_size, scale, eps):
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    for g in range(0, len(r), group_size):
        grp = r[g:g + group_size]
        std = {"group": np.std(grp, ddof=1), "batch": np.std(r, ddof=1), "none": None}[scale]
        out[g:g + group_size] = (grp - grp.mean()) / (1.0 if std is None else std + eps)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(scale):
    rewards = np.random.default_rng(0).normal(size=2 * G).astype(np.float32)
    got = jax.jit(functools.partial(group_advantages, group_size=G, scale=scale))(rewards)
    np.testing.assert_allclose(got, ref_group_advantages(rewards, G, scale, 1e-6), rtol=1e-5, atol=1e-6)


def test_group_advantages_hand_computed_and_refusals():
    got = group_advantages(jnp.array([1.0, 0.0, 5.0, 5.0]), 2, eps=0.0)
    np.testing.assert_allclose(got, [np.sqrt(0.5), -np.sqrt(0.5), 0.0, 0.0], rtol=RTOL32)
    np.testing.assert_allclose(group_advantages(jnp.array([1.0, 0.0, 3.0, 5.0]), 2, scale="none"), [0.5, -0.5, -1, 1])
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(6), 1)
    with pytest.raises(ValueError, match="none"):
        group_advantages(jnp.zeros(4), 2, scale="rank")


def _grpo_inputs(seed):
    rng = np.random.default_rng(seed)
    old = (-rng.random((B, T)) * 3).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * 0.4).astype(np.float32)
    ref = (lp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return lp, old, ref, adv, right_padded_mask(rng)


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_grpo_matches_reference(agg, kl):
    lp, old, ref, adv, mask = _grpo_inputs(1)
    fn = functools.partial(grpo_loss, beta=0.04, kl=kl, agg=agg, clip_eps_high=0.25)
    loss, metrics = jax.jit(fn)(lp, old, ref, adv, mask)
    per_token = ref_policy_per_token(lp, old, adv, 0.2, 0.25) + 0.04 * ref_kl(lp, ref, kl)
    np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, agg), rtol=RTOL32, atol=RTOL32)
    np.testing.assert_allclose(metrics["kl"], ref_aggregate(ref_kl(lp, ref, kl), mask, "token-mean"), rtol=1e-5)
    if agg == "seq-mean-token-mean" and kl == "k3":  # one gradient check is enough per formula
        check_grad(lambda x: fn(x, *(jnp.asarray(v, x.dtype) for v in (old, ref, adv, mask)))[0], lp)
        check_grad(lambda r: fn(*(jnp.asarray(v, r.dtype) for v in (lp, old)), r, adv, mask)[0], ref)


def test_grpo_hand_computed():
    lp = jnp.zeros((2, 3))
    m = jnp.ones((2, 3))
    # ρ = 1 everywhere; KL k1 with ref = lp − log 2 is log 2 per token.
    loss, metrics = grpo_loss(lp, lp, lp - np.log(2.0), jnp.array([1.0, 3.0]), m, beta=0.5, kl="k1")
    np.testing.assert_allclose(loss, -2.0 + 0.5 * np.log(2.0), rtol=RTOL32)
    np.testing.assert_allclose(metrics["kl"], np.log(2.0), rtol=RTOL32)


def test_identical_rewards_give_zero_advantage_and_zero_gradient():
    lp, old, ref, _, mask = _grpo_inputs(2)
    for scale in ("group", "batch", "none"):
        assert np.all(np.asarray(group_advantages(jnp.full(6, 0.1), 3, scale=scale)) == 0.0)
    adv = group_advantages(jnp.array([0.7, 0.7, 0.7, 0.7]), G)
    assert np.all(np.asarray(adv) == 0.0)
    grad_of = jax.jit(jax.grad(lambda x, a: grpo_loss(x, old, None, a, mask, beta=0.0)[0]))
    assert np.all(np.asarray(grad_of(lp, adv)) == 0.0)
    # Another group in the batch with signal still gets gradient; this one none.
    grad = grad_of(lp, group_advantages(jnp.array([0.7, 0.7, 0.0, 1.0]), 2))
    assert np.all(np.asarray(grad[:2]) == 0.0) and np.any(np.asarray(grad[2:]) != 0.0)


def test_beta_zero_never_touches_ref():
    lp, old, ref, adv, mask = _grpo_inputs(3)
    with_ref, metrics = grpo_loss(lp, old, ref, adv, mask, beta=0.0)
    without, metrics_none = grpo_loss(lp, old, None, adv, mask, beta=0.0)
    np.testing.assert_array_equal(with_ref, without)
    assert "kl" in metrics and "kl" not in metrics_none
    grad_ref = jax.grad(lambda r: grpo_loss(lp, old, r, adv, mask, beta=0.0)[0])(ref)
    assert np.all(np.asarray(grad_ref) == 0.0)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(lp, old, None, adv, mask, beta=0.04)


def test_dapo_clip_higher():
    """A > 0 tokens may rise to 1 + ε_high = 1.28 before clipping; A < 0 tokens
    clip at 1 − ε_low = 0.8. Symmetric GRPO would already clip at 1.2."""
    rho = jnp.array([[1.25, 1.30, 0.81, 0.79]])
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    old = jnp.zeros((1, 4))
    m = jnp.ones((1, 4))
    grad_dapo = jax.jit(jax.grad(lambda x: dapo_loss(x, old, adv, m)[0]))(jnp.log(rho))
    grad_grpo = jax.jit(jax.grad(lambda x: grpo_loss(x, old, None, adv, m, beta=0.0, agg="token-mean")[0]))(
        jnp.log(rho))
    np.testing.assert_allclose(grad_dapo, [[-1.25 / 4, 0.0, 0.81 / 4, 0.0]], rtol=RTOL32)
    np.testing.assert_allclose(grad_grpo, [[0.0, 0.0, 0.81 / 4, 0.0]], rtol=RTOL32)
    _, metrics = dapo_loss(jnp.log(rho), old, adv, m)
    assert float(metrics["clip_frac_high"]) == 0.25 and float(metrics["clip_frac_low"]) == 0.25


def test_dapo_is_grpo_without_kl_and_token_mean():
    lp, old, _, adv, mask = _grpo_inputs(4)
    a, _ = jax.jit(dapo_loss)(lp, old, adv, mask)
    b, _ = grpo_loss(lp, old, None, adv, mask, beta=0.0, clip_eps_low=0.2, clip_eps_high=0.28, agg="token-mean")
    per_token = ref_policy_per_token(lp, old, adv, 0.2, 0.28)
    np.testing.assert_allclose(a, ref_aggregate(per_token, mask, "token-mean"), rtol=RTOL32)
    np.testing.assert_array_equal(a, b)


def test_overlong_filtering_by_zeroing_mask_rows():
    lp, old, _, adv, mask = _grpo_inputs(5)
    truncated = np.array([False, True, False, False])
    for agg in MODES:
        kept = dapo_loss(lp, old, adv, mask * ~truncated[:, None], agg=agg)[0]
        sliced = dapo_loss(lp[~truncated], old[~truncated], adv[~truncated], mask[~truncated], agg=agg)[0]
        np.testing.assert_allclose(kept, sliced, rtol=RTOL32)


@pytest.mark.parametrize("agg", MODES)
def test_grpo_gradient_accumulation_is_exact(agg):
    lp, old, ref, adv, mask = _grpo_inputs(6)
    mask[2] = 0.0  # an absent row
    # Two micro-batches of one shape (one compile); their token and row
    # counts differ (row 2 is absent), so a mean of means would be wrong.
    fn = functools.partial(grpo_loss, beta=0.04, agg=agg)
    full_grad = jax.jit(jax.grad(lambda x: fn(x, old, ref, adv, mask)[0]))(lp)

    @jax.jit
    @functools.partial(jax.grad, has_aux=True)
    def micro_grad(x, old, ref, adv, mask):
        return fn(x, old, ref, adv, mask, return_parts=True)[0]

    grads, den = [], 0.0
    for s in (slice(0, 2), slice(2, 4)):
        g, d = micro_grad(lp[s], old[s], ref[s], adv[s], mask[s])
        grads.append(g)
        den += d
    np.testing.assert_allclose(np.concatenate(grads) / den, full_grad, rtol=1e-5, atol=1e-8)


def test_grpo_vmap_over_micro_batches():
    lp, old, ref, adv, mask = _grpo_inputs(7)
    stack = lambda x: np.stack([x, x[::-1]])  # noqa: E731
    losses, metrics = jax.vmap(grpo_loss)(*(stack(x) for x in (lp, old, ref, adv, mask)))
    for i, sl in enumerate((slice(None), slice(None, None, -1))):
        want, want_m = grpo_loss(lp[sl], old[sl], ref[sl], adv[sl], mask[sl])
        np.testing.assert_allclose(losses[i], want, rtol=RTOL32)
        np.testing.assert_allclose(metrics["clip_frac_high"][i], want_m["clip_frac_high"], rtol=RTOL32)


def test_dynamic_sampling_mask():
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3 + 1e-8, 0.3, 0.3])
    np.testing.assert_array_equal(jax.jit(dynamic_sampling_mask, static_argnums=1)(rewards, 4),
                                  [False, True, False, False])
    np.testing.assert_array_equal(dynamic_sampling_mask(jnp.array([0.0, 1.0, 0.5, 0.5]), 2), [True, False])
    with pytest.raises(ValueError, match="multiple"):
        dynamic_sampling_mask(jnp.zeros(5), 2)


def test_overlong_penalty():
    lengths = jnp.array([0, 16, 17, 18, 20, 21, 100])
    got = jax.jit(functools.partial(overlong_penalty, max_len=20, cache_len=4))(lengths)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0], rtol=RTOL32)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=20, cache_len=0)
