"""GSPO and CISPO against float64 NumPy references: values, gradients,
masking, micro-batch parts, edge cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import AGGREGATIONS, cispo_loss, gspo_loss, ppo_policy_loss
from tests.test_losses_aggregation import ref_aggregate
from tests.test_losses_common import B, FD_TOL, RTOL32, T, check_grad, fd_grad, right_padded_mask


def ref_gspo_rows(lp, old, adv, mask, eps_low, eps_high, weights=None):
    """Per present row: (index, ℓ_i, s_i), in float64."""
    lp, old, adv, mask = (np.asarray(x, np.float64) for x in (lp, old, adv, mask))
    rows = []
    for i in range(len(lp)):
        m = mask[i] > 0
        if not m.any():
            continue
        s = np.exp(np.mean(lp[i][m] - old[i][m]))
        loss = max(-adv[i] * s, -adv[i] * min(max(s, 1 - eps_low), 1 + eps_high))
        if weights is not None:
            loss *= np.mean(np.asarray(weights, np.float64)[i][m])
        rows.append((i, loss, s))
    return rows


def ref_gspo(lp, old, adv, mask, eps_low, eps_high, weights=None):
    rows = ref_gspo_rows(lp, old, adv, mask, eps_low, eps_high, weights)
    return np.mean([loss for _, loss, _ in rows]) if rows else 0.0


def ref_cispo_per_token(lp, old, adv, eps_low, eps_high, frozen=None):
    """ℓ_t = −w_t A lp_t with w_t from `frozen` log-probs (default `lp`): the
    weights are constants of the gradient, so finite differences must hold
    them fixed."""
    lp, old, adv = (np.asarray(x, np.float64) for x in (lp, old, adv))
    frozen = lp if frozen is None else np.asarray(frozen, np.float64)
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], lp.shape[1], axis=1)
    w = np.minimum(np.exp(frozen - old), 1 + eps_high)
    if eps_low is not None:
        w = np.maximum(w, 1 - eps_low)
    return -w * adv * lp


def _inputs(seed, scale=0.4):
    rng = np.random.default_rng(seed)
    old = (-rng.random((B, T)) * 3).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * scale).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return lp, old, adv, right_padded_mask(rng)


# --- GSPO ---------------------------------------------------------------------


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.06)])
def test_gspo_matches_reference(eps):
    lp, old, adv, mask = _inputs(1, scale=0.2)
    fn = functools.partial(gspo_loss, clip_eps_low=eps[0], clip_eps_high=eps[1])
    loss, metrics = jax.jit(fn)(lp, old, adv, mask)
    np.testing.assert_allclose(loss, ref_gspo(lp, old, adv, mask, *eps), rtol=1e-5, atol=1e-6)
    rows = ref_gspo_rows(lp, old, adv, mask, *eps)
    s = np.array([r[2] for r in rows])
    a = np.array([adv[r[0]] for r in rows])
    np.testing.assert_allclose(metrics["clip_frac_low"], np.mean((a < 0) & (s < 1 - eps[0])), rtol=RTOL32)
    np.testing.assert_allclose(metrics["clip_frac_high"], np.mean((a > 0) & (s > 1 + eps[1])), rtol=RTOL32)
    np.testing.assert_allclose(metrics["ratio_mean"], s.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], s.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_min"], s.min(), rtol=1e-5)
    rho = np.exp(np.float64(lp) - old)
    np.testing.assert_allclose(metrics["approx_kl"], np.sum(mask * (rho - 1 - np.log(rho))) / mask.sum(), rtol=1e-5)
    if eps[0] == 0.05:  # band wide enough that some rows are clipped (both sides) and some are not
        assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
        assert float(metrics["clip_frac_low"]) + float(metrics["clip_frac_high"]) < 1
        check_grad(lambda x: fn(x, *(jnp.asarray(v, x.dtype) for v in (old, adv, mask)))[0], lp)


def test_gspo_hand_computed_and_gradient():
    # Row 0: three tokens, each log ρ = 0.1 → s = e^0.1, A = 1 → clipped at 1 + ε_high.
    # Row 1: one token, s = e^0.1, A = −1 → unclipped (pessimistic side): ℓ = s.
    lp = jnp.zeros((2, 3))
    m = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = jnp.array([1.0, -1.0])
    loss, metrics = gspo_loss(lp + 0.1, lp, adv, m)
    np.testing.assert_allclose(loss, (-(1 + 4e-4) + np.exp(0.1)) / 2, rtol=RTOL32)
    assert float(metrics["clip_frac_high"]) == 0.5 and float(metrics["clip_frac_low"]) == 0.0
    # Hand-derived: the clipped row has no gradient; the other row's token gets
    # ∂/∂lp (s/2) = s/(2·|y|) with |y| = 1.
    grad = jax.grad(lambda x: gspo_loss(x, lp, adv, m)[0])(lp + 0.1)
    np.testing.assert_allclose(grad, [[0, 0, 0], [np.exp(0.1) / 2, 0, 0]], rtol=RTOL32)


def test_gspo_on_policy_gradient_is_sequence_mean():
    """old = None: s = 1, and ∂L/∂lp_t = −A_i / (|y_i| · #rows), each token of
    a row weighed by 1/|y_i| (the geometric mean), unlike PPO's token ratio."""
    lp, _, adv, mask = _inputs(1)
    loss, metrics = gspo_loss(lp, None, adv, mask)
    np.testing.assert_allclose(loss, -np.mean(adv), rtol=RTOL32, atol=RTOL32)
    assert float(metrics["ratio_max"]) == 1.0 == float(metrics["ratio_min"])
    grad = jax.grad(lambda x: gspo_loss(x, None, adv, mask)[0])(lp)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(-1, keepdims=True) / B, rtol=RTOL32)


def test_gspo_empty_rows_garbage_padding_and_parts():
    lp, old, adv, mask = _inputs(2, scale=0.05)
    mask[1] = 0.0  # a row with an empty mask is absent
    fn = functools.partial(gspo_loss, clip_eps_low=0.02, clip_eps_high=0.03)
    bad_lp = np.where(mask > 0, lp, -np.inf).astype(np.float32)
    bad_old = np.where(mask > 0, old, np.nan).astype(np.float32)
    bad_adv = adv.copy()
    bad_adv[1] = np.nan
    (clean, _), (dirty, metrics) = fn(lp, old, adv, mask), fn(bad_lp, bad_old, bad_adv, mask)
    np.testing.assert_array_equal(clean, dirty)
    np.testing.assert_allclose(clean, ref_gspo(lp, old, adv, mask, 0.02, 0.03), rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda x: fn(x, bad_old, bad_adv, mask)[0])(bad_lp)
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)
    num = den = 0.0
    for s in (slice(0, 1), slice(1, 3), slice(3, B)):  # the middle one holds the empty row
        (n, d), _ = fn(lp[s], old[s], adv[s], mask[s], return_parts=True)
        num, den = num + n, den + d
    assert float(den) == B - 1
    np.testing.assert_allclose(num / den, clean, rtol=RTOL32)
    # Nothing to train on: loss 0, finite gradient, not NaN.
    empty = np.zeros_like(mask)
    loss, metrics = fn(lp, old, adv, empty)
    assert float(loss) == 0.0 and all(np.isfinite(v) for k, v in metrics.items() if not k.startswith("ratio_m"))
    assert np.all(np.asarray(jax.grad(lambda x: fn(x, old, adv, empty)[0])(lp)) == 0)


def test_gspo_refuses_token_advantages():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="advantages must be \\[batch\\]"):
        gspo_loss(x, x, x, x + 1)


# --- CISPO --------------------------------------------------------------------


@pytest.mark.parametrize(
    "eps_low,agg,per_sequence",
    [(None, "token-mean", True), (0.2, "seq-mean-token-mean", False), (None, "seq-mean-token-sum-norm", True)],
)
def test_cispo_matches_reference(eps_low, agg, per_sequence):
    lp, old, adv, mask = _inputs(3)
    if not per_sequence:
        adv = np.random.default_rng(4).normal(size=(B, T)).astype(np.float32)
    fn = functools.partial(cispo_loss, eps_low=eps_low, eps_high=0.28, agg=agg)
    loss, metrics = jax.jit(fn)(lp, old, adv, mask)
    per_token = ref_cispo_per_token(lp, old, adv, eps_low, 0.28)
    np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, agg), rtol=1e-5, atol=1e-6)
    rho = np.exp(np.float64(lp) - old)
    n = mask.sum()
    np.testing.assert_allclose(metrics["clip_frac_high"], np.sum(mask * (rho > 1.28)) / n, rtol=RTOL32)
    low = 0.0 if eps_low is None else np.sum(mask * (rho < 1 - eps_low)) / n
    np.testing.assert_allclose(metrics["clip_frac_low"], low, rtol=RTOL32)
    np.testing.assert_allclose(metrics["ratio_mean"], rho[mask > 0].mean(), rtol=1e-5)
    assert float(metrics["clip_frac_high"]) > 0  # the inputs exercise the clip

    # The gradient treats the clipped weight as a constant: compare with finite
    # differences of the reference whose weights are frozen at lp.
    with jax.enable_x64(True):
        f64 = lambda x: fn(x, *(jnp.asarray(v, jnp.float64) for v in (old, adv, mask)))[0]  # noqa: E731
        analytic = np.asarray(jax.grad(f64)(jnp.asarray(lp, jnp.float64)))
    numeric = fd_grad(lambda x: ref_aggregate(ref_cispo_per_token(x, old, adv, eps_low, 0.28, frozen=lp), mask, agg),
                      lp)
    np.testing.assert_allclose(analytic, numeric, rtol=FD_TOL, atol=FD_TOL)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """A token with ρ = 2 and A > 0: PPO's clip zeroes its gradient, CISPO
    keeps −w·A = −1.28 (token-mean over one token)."""
    old = jnp.log(jnp.full((1, 1), 0.25))
    one = jnp.ones((1, 1))
    lp = old + jnp.log(2.0)
    g_cispo = jax.grad(lambda x: cispo_loss(x, old, jnp.ones(1), one)[0])(lp)
    g_ppo = jax.grad(lambda x: ppo_policy_loss(x, old, jnp.ones(1), one)[0])(lp)
    np.testing.assert_allclose(g_cispo, [[-1.28]], rtol=RTOL32)
    assert float(g_ppo[0, 0]) == 0.0
    loss, _ = cispo_loss(lp, old, jnp.ones(1), one)
    np.testing.assert_allclose(loss, -1.28 * np.log(0.5), rtol=RTOL32)
    # eps_low bounds the weight from below: ρ = 0.5 with ε_low = 0.2 → w = 0.8.
    g_low = jax.grad(lambda x: cispo_loss(x, old, jnp.ones(1), one, eps_low=0.2)[0])(old + jnp.log(0.5))
    np.testing.assert_allclose(g_low, [[-0.8]], rtol=RTOL32)


def test_cispo_on_policy_garbage_padding_and_parts():
    lp, old, adv, mask = _inputs(5)
    loss, _ = cispo_loss(lp, None, adv, mask)  # w = 1: −mean(A·lp)
    np.testing.assert_allclose(loss, -np.sum(adv[:, None] * lp * mask) / mask.sum(), rtol=1e-5)

    mask[2] = 0.0
    bad_lp = np.where(mask > 0, lp, -np.inf).astype(np.float32)
    bad_old = np.where(mask > 0, old, np.nan).astype(np.float32)
    (clean, _), (dirty, metrics) = cispo_loss(lp, old, adv, mask), cispo_loss(bad_lp, bad_old, adv, mask)
    np.testing.assert_array_equal(clean, dirty)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda x: cispo_loss(x, bad_old, adv, mask)[0])(bad_lp)
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)
    for agg in sorted(AGGREGATIONS):
        full, _ = cispo_loss(lp, old, adv, mask, agg=agg)
        num = den = 0.0
        for s in (slice(0, 1), slice(1, 3), slice(3, B)):
            (n, d), _ = cispo_loss(lp[s], old[s], adv[s], mask[s], agg=agg, return_parts=True)
            num, den = num + n, den + d
        np.testing.assert_allclose(num / den, full, rtol=RTOL32, err_msg=agg)
