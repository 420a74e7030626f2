"""PPO policy and value losses, GAE, whiten."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import AGGREGATIONS, gae, ppo_policy_loss, ppo_value_loss, whiten
from tests.test_losses_aggregation import ref_aggregate
from tests.test_losses_common import B, RTOL32, T, check_grad, holey_mask, right_padded_mask


def ref_policy_per_token(lp, old, adv, eps_low, eps_high, dual=None):
    lp, old, adv = (np.asarray(x, np.float64) for x in (lp, old, adv))
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], lp.shape[1], axis=1)
    out = np.zeros(lp.shape)
    for b, t in np.ndindex(lp.shape):
        rho, a = np.exp(lp[b, t] - old[b, t]), adv[b, t]
        loss = max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
        if dual is not None and a < 0:
            loss = min(loss, -dual * a)
        out[b, t] = loss
    return out


def _policy_inputs(seed, per_sequence=False):
    rng = np.random.default_rng(seed)
    old = (-rng.random((B, T)) * 3).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * 0.4).astype(np.float32)  # ratios ~0.45–2.2
    adv = rng.normal(size=(B,) if per_sequence else (B, T)).astype(np.float32)
    return lp, old, adv, right_padded_mask(rng)


@pytest.mark.parametrize(
    "eps_high,dual,per_sequence,agg",
    [(None, None, False, "token-mean"), (0.28, None, True, "seq-mean-token-mean"),
     (None, 3.0, False, "seq-mean-token-sum"), (0.3, 1.5, True, "seq-mean-token-sum-norm")],
)
def test_policy_loss_matches_reference(eps_high, dual, per_sequence, agg):
    lp, old, adv, mask = _policy_inputs(0, per_sequence)
    fn = functools.partial(ppo_policy_loss, clip_eps_low=0.2, clip_eps_high=eps_high, dual_clip=dual, agg=agg)
    loss, metrics = jax.jit(fn)(lp, old, adv, mask)
    hi = 0.2 if eps_high is None else eps_high
    per_token = ref_policy_per_token(lp, old, adv, 0.2, hi, dual)
    np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, agg), rtol=RTOL32, atol=RTOL32)

    rho = np.exp(np.float64(lp) - old)
    a = adv[:, None] * np.ones((1, T)) if per_sequence else adv
    n = mask.sum()
    np.testing.assert_allclose(metrics["clip_frac_low"], np.sum(mask * ((a < 0) & (rho < 0.8))) / n, rtol=RTOL32)
    np.testing.assert_allclose(metrics["clip_frac_high"], np.sum(mask * ((a > 0) & (rho > 1 + hi))) / n, rtol=RTOL32)
    np.testing.assert_allclose(metrics["approx_kl"], np.sum(mask * (rho - 1 - np.log(rho))) / n, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], rho[mask > 0].max(), rtol=RTOL32)
    np.testing.assert_allclose(metrics["ratio_min"], rho[mask > 0].min(), rtol=RTOL32)
    np.testing.assert_allclose(metrics["ratio_mean"], rho[mask > 0].mean(), rtol=RTOL32)
    assert 0 < float(metrics["clip_frac_low"]) + float(metrics["clip_frac_high"]) < 1  # the inputs exercise clipping
    check_grad(lambda x: fn(x, *(jnp.asarray(v, x.dtype) for v in (old, adv, mask)))[0], lp)


def test_policy_loss_hand_computed():
    lp = jnp.zeros((1, 1))
    one = jnp.ones((1, 1))
    loss = lambda rho, a, **kw: float(ppo_policy_loss(lp + np.log(rho), lp, jnp.full((1,), a), one, **kw)[0])  # noqa: E731
    assert np.isclose(loss(2.0, 1.0), -1.2)  # A > 0: capped at 1 + ε
    assert np.isclose(loss(0.5, 1.0), -0.5)  # A > 0, ρ < 1 − ε: unclipped
    assert np.isclose(loss(0.5, -1.0), 0.8)  # A < 0: the low clip binds
    assert np.isclose(loss(5.0, -1.0), 5.0)  # A < 0, big ρ: pessimistic, unbounded
    assert np.isclose(loss(5.0, -1.0, dual_clip=3.0), 3.0)  # dual clip bounds it by −cA
    assert np.isclose(loss(1.25, 1.0, clip_eps_high=0.28), -1.25)


def test_policy_loss_garbage_padding_does_not_leak():
    lp, old, adv, mask = _policy_inputs(1)
    bad_lp = np.where(mask > 0, lp, -np.inf).astype(np.float32)
    bad_old = np.where(mask > 0, old, np.nan).astype(np.float32)
    bad_adv = np.where(mask > 0, adv, np.nan).astype(np.float32)
    fn = lambda x, o, a=bad_adv: ppo_policy_loss(x, o, a, mask, dual_clip=2.0)  # noqa: E731
    (clean, _), (dirty, metrics) = fn(lp, old, adv), fn(bad_lp, bad_old)
    np.testing.assert_array_equal(clean, dirty)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda x: fn(x, bad_old)[0])(bad_lp)
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)


def test_value_loss_garbage_padding_does_not_leak():
    lp, old, adv, mask = _policy_inputs(7)
    garbage = lambda x: np.where(mask > 0, x, np.nan).astype(np.float32)  # noqa: E731
    fn = lambda v, o, r: ppo_value_loss(v, o, r, mask)  # noqa: E731
    (clean, _), (dirty, metrics) = fn(lp, old, adv), fn(garbage(lp), garbage(old), garbage(adv))
    np.testing.assert_array_equal(clean, dirty)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda v: fn(v, garbage(old), garbage(adv))[0])(garbage(lp))
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)


def test_policy_loss_on_policy_when_old_is_none():
    lp, _, adv, mask = _policy_inputs(2)
    loss, metrics = ppo_policy_loss(lp, None, adv, mask)
    np.testing.assert_allclose(loss, -np.sum(adv * mask) / mask.sum(), rtol=RTOL32, atol=RTOL32)
    assert float(metrics["ratio_max"]) == 1.0
    grad = jax.grad(lambda x: ppo_policy_loss(x, None, adv, mask)[0])(lp)
    np.testing.assert_allclose(grad, -adv * mask / mask.sum(), rtol=RTOL32)  # REINFORCE gradient


def test_policy_loss_refuses_bad_dual_clip_and_agg():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(x, x, x, x + 1, dual_clip=1.0)
    with pytest.raises(ValueError, match="token-mean"):
        ppo_policy_loss(x, x, x, x + 1, agg="mean")


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_reference(clip):
    rng = np.random.default_rng(3)
    v, old_v, ret = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
    v = (old_v + 0.5 * (v - old_v)).astype(np.float32)
    mask = right_padded_mask(rng)
    fn = functools.partial(ppo_value_loss, clip=clip)
    loss, metrics = jax.jit(fn)(v, old_v, ret, mask)
    un = (np.float64(v) - ret) ** 2
    if clip is None:
        per_token, frac = 0.5 * un, 0.0
    else:
        cl = (old_v + np.clip(np.float64(v) - old_v, -clip, clip) - ret) ** 2
        per_token, frac = 0.5 * np.maximum(un, cl), np.sum(mask * (cl > un)) / mask.sum()
        assert 0 < frac < 1
    np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, "token-mean"), rtol=RTOL32)
    np.testing.assert_allclose(metrics["value_clip_frac"], frac, rtol=RTOL32)
    r, res = ret[mask > 0].astype(np.float64), (np.float64(ret) - v)[mask > 0]
    np.testing.assert_allclose(metrics["explained_variance"], 1 - res.var() / r.var(), rtol=1e-5)
    check_grad(lambda x: fn(x, *(jnp.asarray(a, x.dtype) for a in (old_v, ret, mask)))[0], v)


def test_value_loss_hand_computed():
    m = jnp.ones((1, 1))
    val = lambda v, old, r: float(ppo_value_loss(jnp.full((1, 1), v), jnp.full((1, 1), old), jnp.full((1, 1), r), m)[0])  # noqa: E731
    assert np.isclose(val(0.0, 0.0, 1.0), 0.5)
    assert np.isclose(val(1.0, 0.0, 0.0), 0.5)  # unclipped (1) beats clipped (0.04)
    assert np.isclose(val(0.5, 0.0, 1.0), 0.32)  # clipped: ½(0.2 − 1)²


def ref_gae(rewards, values, mask, gamma, lam):
    """Walk the valid tokens of each row backwards; masked tokens are skipped."""
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        next_v = next_a = 0.0
        for t in reversed(np.flatnonzero(mask[b])):
            next_a = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * next_a
            next_v = values[b, t]
            adv[b, t], ret[b, t] = next_a, next_a + values[b, t]
    return adv, ret


def textbook_gae(rewards, values, length, gamma, lam):
    """Plain GAE on one unpadded row."""
    adv, last = np.zeros(length), 0.0
    for t in reversed(range(length)):
        nv = values[t + 1] if t + 1 < length else 0.0
        last = rewards[t] + gamma * nv - values[t] + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_reference(holes):
    rng = np.random.default_rng(4)
    rewards, values = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
    mask = holey_mask(rng) if holes else right_padded_mask(rng)
    adv, ret = jax.jit(functools.partial(gae, gamma=0.9, lam=0.8))(rewards, values, mask)
    ref_adv, ref_ret = ref_gae(np.float64(rewards), np.float64(values), mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, ref_adv, rtol=RTOL32, atol=RTOL32)
    np.testing.assert_allclose(ret, ref_ret, rtol=RTOL32, atol=RTOL32)
    if not holes:
        for b, length in enumerate(mask.sum(1).astype(int)):
            want = textbook_gae(np.float64(rewards[b]), np.float64(values[b]), length, 0.9, 0.8)
            np.testing.assert_allclose(adv[b, :length], want, rtol=RTOL32, atol=RTOL32)


def test_gae_hand_computed_and_no_leak():
    r = jnp.array([[0.0, 0.0, 1.0, 7.0]])
    v = jnp.array([[0.5, 0.5, 0.5, np.nan]])
    m = jnp.array([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    # δ = [−0.05, −0.05, 0.5]; A2 = 0.5, A1 = −0.05 + 0.72·0.5, A0 = −0.05 + 0.72·A1.
    np.testing.assert_allclose(adv, [[-0.05 + 0.72 * 0.31, 0.31, 0.5, 0.0]], rtol=RTOL32)
    np.testing.assert_allclose(ret, [[0.5 + 0.1732, 0.81, 1.0, 0.0]], rtol=RTOL32)


def test_whiten():
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(B, T)).astype(np.float32)
    mask = right_padded_mask(rng)
    valid = np.float64(x[mask > 0])
    want = np.where(mask > 0, (np.float64(x) - valid.mean()) / np.sqrt(valid.var() + 1e-8), 0.0)
    np.testing.assert_allclose(jax.jit(whiten)(x, mask), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whiten(x, mask, shift_mean=False), np.where(mask > 0, want + valid.mean(), 0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whiten(jnp.array([[1.0, 3.0, 9.0]]), jnp.array([[1, 1, 0]])), [[-1, 1, 0]], rtol=1e-6)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_policy_and_value_parts_accumulate(agg):
    lp, old, adv, mask = _policy_inputs(6)
    mask[1] = 0.0  # an absent row
    full, _ = ppo_policy_loss(lp, old, adv, mask, agg=agg)
    full_v, _ = ppo_value_loss(lp, old, adv, mask, agg=agg)
    num = den = num_v = den_v = 0.0
    for s in (slice(0, 1), slice(1, 3), slice(3, B)):
        (n, d), _ = ppo_policy_loss(lp[s], old[s], adv[s], mask[s], agg=agg, return_parts=True)
        (nv, dv), _ = ppo_value_loss(lp[s], old[s], adv[s], mask[s], agg=agg, return_parts=True)
        num, den, num_v, den_v = num + n, den + d, num_v + nv, den_v + dv
    np.testing.assert_allclose(num / den, full, rtol=RTOL32)
    np.testing.assert_allclose(num_v / den_v, full_v, rtol=RTOL32)
