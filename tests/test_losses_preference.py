"""Bradley–Terry, DPO (sigmoid/cDPO, robust, IPO, hinge, RPO), SimPO, ORPO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, log_odds, orpo_loss, simpo_loss
from tests.test_losses_common import B, RTOL32, check_grad

LOG2 = np.log(2.0)


def neg_log_sigmoid(x):
    return np.logaddexp(0.0, -np.asarray(x, np.float64))


def ref_dpo(pw, pl, rw, rl, beta, loss_type, eps):
    h = (np.float64(pw) - rw) - (np.float64(pl) - rl)
    z = beta * h
    if loss_type == "sigmoid":
        per = (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)
    elif loss_type == "robust":
        per = ((1 - eps) * neg_log_sigmoid(z) - eps * neg_log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        per = (z / beta - 1 / (2 * beta)) ** 2
    else:
        per = np.maximum(0.0, 1 - z)
    return per.mean()


def _logps(seed, n=4):
    rng = np.random.default_rng(seed)
    return [(-rng.random(B) * 20).astype(np.float32) for _ in range(n)]


def test_bradley_terry_reference_constants_and_gradient():
    rng = np.random.default_rng(0)
    rw, rl, margin = (rng.normal(size=B).astype(np.float32) for _ in range(3))
    loss, m = jax.jit(bradley_terry_loss)(rw, rl, margin=margin)
    np.testing.assert_allclose(loss, neg_log_sigmoid(np.float64(rw) - rl - margin).mean(), rtol=RTOL32)
    np.testing.assert_allclose(m["accuracy"], np.mean(rw > rl), rtol=RTOL32)
    np.testing.assert_allclose(m["margin"], np.mean(np.float64(rw) - rl), rtol=RTOL32, atol=RTOL32)
    np.testing.assert_allclose(m["chosen_reward"], np.mean(rw), rtol=RTOL32, atol=RTOL32)
    # Constants: equal rewards give log 2; a gap equal to the margin too.
    np.testing.assert_allclose(bradley_terry_loss(jnp.zeros(2), jnp.zeros(2))[0], LOG2, rtol=RTOL32)
    np.testing.assert_allclose(bradley_terry_loss(jnp.ones(2), jnp.zeros(2), margin=1.0)[0], LOG2, rtol=RTOL32)
    check_grad(lambda r: bradley_terry_loss(r, jnp.asarray(rl, r.dtype))[0], rw)


@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_matches_reference_and_gradient(loss_type, eps):
    pw, pl, rw, rl = _logps(1)
    beta = 0.1
    fn = functools.partial(dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss, metrics = jax.jit(fn)(pw, pl, rw, rl)
    np.testing.assert_allclose(loss, ref_dpo(pw, pl, rw, rl, beta, loss_type, eps), rtol=RTOL32)
    cr, rr = beta * (np.float64(pw) - rw), beta * (np.float64(pl) - rl)
    np.testing.assert_allclose(metrics["chosen_reward"], cr.mean(), rtol=RTOL32)
    np.testing.assert_allclose(metrics["rejected_reward"], rr.mean(), rtol=RTOL32)
    np.testing.assert_allclose(metrics["reward_margin"], (cr - rr).mean(), rtol=RTOL32)
    np.testing.assert_allclose(metrics["reward_accuracy"], np.mean(cr > rr), rtol=RTOL32)
    check_grad(lambda p: fn(p, *(jnp.asarray(a, p.dtype) for a in (pl, rw, rl)))[0], pw)


def test_dpo_hand_computed_constants():
    z0 = jnp.zeros(3)
    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.3)]:
        loss, _ = dpo_loss(z0, z0, z0, z0, loss_type=loss_type, label_smoothing=eps)
        np.testing.assert_allclose(loss, LOG2, rtol=RTOL32)  # z = 0 gives log 2 for every ε
    np.testing.assert_allclose(dpo_loss(z0, z0, z0, z0, beta=0.1, loss_type="ipo")[0], 25.0, rtol=RTOL32)
    np.testing.assert_allclose(dpo_loss(z0, z0, z0, z0, loss_type="hinge")[0], 1.0, rtol=RTOL32)
    # IPO reaches 0 exactly at the target margin h = 1/(2β) = 5 (β = 0.1).
    h = jnp.full(3, 5.0)
    np.testing.assert_allclose(dpo_loss(h, z0, z0, z0, beta=0.1, loss_type="ipo")[0], 0.0, atol=1e-12)
    # Hinge at z = β·h = 1 is 0, at z = 0.5 is 0.5.
    np.testing.assert_allclose(dpo_loss(h, z0, z0, z0, beta=0.2, loss_type="hinge")[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(dpo_loss(h, z0, z0, z0, beta=0.1, loss_type="hinge")[0], 0.5, rtol=RTOL32)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_dpo_beta_enters_once(loss_type):
    pw, pl, rw, rl = _logps(2)
    # z = β·h: doubling β equals doubling every log-prob (so h doubles), except
    # IPO, whose loss is (h − 1/(2β))²: check that form with h and β separately.
    if loss_type == "ipo":
        h = (np.float64(pw) - rw) - (np.float64(pl) - rl)
        for beta in (0.05, 0.4):
            got = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="ipo")[0]
            np.testing.assert_allclose(got, np.mean((h - 1 / (2 * beta)) ** 2), rtol=RTOL32)
        return
    a = dpo_loss(pw, pl, rw, rl, beta=0.2, loss_type=loss_type)
    b = dpo_loss(2 * pw, 2 * pl, 2 * rw, 2 * rl, beta=0.1, loss_type=loss_type)
    np.testing.assert_allclose(a[0], b[0], rtol=RTOL32)
    np.testing.assert_allclose(a[1]["chosen_reward"], b[1]["chosen_reward"], rtol=RTOL32)


def test_dpo_gradient_at_zero_is_beta_over_two():
    # d/dπ_w of −log σ(β h) at h = 0 is −β/2 per pair (mean over B pairs):
    # a second β would make it −β²/2.
    beta = 0.3
    grad = jax.grad(lambda p: dpo_loss(p, jnp.zeros(B), jnp.zeros(B), jnp.zeros(B), beta=beta)[0])(jnp.zeros(B))
    np.testing.assert_allclose(grad, np.full(B, -beta / 2 / B), rtol=RTOL32)


def test_dpo_rpo_adds_alpha_times_nll():
    pw, pl, rw, rl = _logps(3)
    nll = np.abs(pw) / 5
    base, _ = dpo_loss(pw, pl, rw, rl)
    logged, m = dpo_loss(pw, pl, rw, rl, chosen_nll=nll)
    with_rpo, m2 = dpo_loss(pw, pl, rw, rl, chosen_nll=nll, rpo_alpha=0.5)
    np.testing.assert_allclose(logged, base, rtol=RTOL32)  # α = 0: logged only
    np.testing.assert_allclose(with_rpo, base + 0.5 * nll.mean(), rtol=RTOL32)
    np.testing.assert_allclose(m2["preference_loss"], base, rtol=RTOL32)
    np.testing.assert_allclose(m["chosen_nll"], nll.mean(), rtol=RTOL32)


def test_dpo_refuses_bad_arguments():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="hinge.*ipo.*robust.*sigmoid"):
        dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(z, z, z, z, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(z, z, z, z, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)


def test_dpo_parts_accumulate_and_vmap():
    pw, pl, rw, rl = _logps(4)
    full, _ = dpo_loss(pw, pl, rw, rl, loss_type="robust", label_smoothing=0.2)
    halves = [dpo_loss(pw[s], pl[s], rw[s], rl[s], loss_type="robust", label_smoothing=0.2, return_parts=True)[0]
              for s in (slice(0, 1), slice(1, B))]
    np.testing.assert_allclose(sum(n for n, _ in halves) / sum(d for _, d in halves), full, rtol=RTOL32)
    stacked = [np.stack([x, x[::-1]]) for x in (pw, pl, rw, rl)]
    per_batch, _ = jax.vmap(dpo_loss)(*stacked)
    np.testing.assert_allclose(per_batch, [dpo_loss(pw, pl, rw, rl)[0]] * 2, rtol=RTOL32)


def test_simpo_reference_constants_and_gradient():
    pw, pl, _, _ = _logps(5)
    lw, ll = np.array([3, 5, 8, 2]), np.array([4, 4, 9, 1])
    loss, m = jax.jit(simpo_loss)(pw, pl, lw, ll)
    z = 2.0 * np.float64(pw) / lw - 2.0 * np.float64(pl) / ll - 0.5
    np.testing.assert_allclose(loss, neg_log_sigmoid(z).mean(), rtol=RTOL32)
    np.testing.assert_allclose(m["chosen_reward"], np.mean(2.0 * np.float64(pw) / lw), rtol=RTOL32)
    one = jnp.ones(1)
    np.testing.assert_allclose(simpo_loss(-one, -one, one, one, gamma=0.0)[0], LOG2, rtol=RTOL32)
    # β(a_w − a_l) = 2.0 · (−1/2 − (−1)) = 1 = γ: log 2 again.
    np.testing.assert_allclose(simpo_loss(-one, -one, 2 * one, one, beta=2.0, gamma=1.0)[0], LOG2, rtol=RTOL32)
    check_grad(lambda p: simpo_loss(p, jnp.asarray(pl, p.dtype), lw, ll)[0], pw)


def test_log_odds_stable_near_zero_and_far():
    a64 = np.array([-1e-6, -1e-3, -0.3, -0.69, -0.7, -5.0, -60.0])
    ref = a64 - np.log(-np.expm1(a64))
    got = np.asarray(log_odds(jnp.asarray(a64, jnp.float32)), np.float64)
    # log odds = a − log(1 − e^a) cancels near a = −log 2 (odds ≈ 1), so the
    # float32 error is relative to the terms (~|a|), not to the result.
    assert np.all(np.abs(got - ref) <= RTOL32 * (np.abs(ref) + np.abs(a64)))
    out = log_odds(jnp.array([0.0]))  # p = 1: large but finite
    assert np.isfinite(out).all() and float(out[0]) > 15
    # Both branches of log(1 − e^a), away from a = 0 where FD steps would
    # cross the clamp.
    check_grad(lambda a: jnp.sum(log_odds(a)), a64[2:])


def test_orpo_reference_constants_and_gradient():
    pw, pl, _, _ = _logps(6)
    lw, ll = np.array([3, 5, 8, 2]), np.array([4, 4, 9, 1])
    nll = -pw / lw
    loss, m = jax.jit(functools.partial(orpo_loss, lam=0.25))(pw, pl, lw, ll, nll)
    aw, al = np.float64(pw) / lw, np.float64(pl) / ll
    ratio = (aw - np.log1p(-np.exp(aw))) - (al - np.log1p(-np.exp(al)))
    np.testing.assert_allclose(loss, np.mean(-aw + 0.25 * neg_log_sigmoid(ratio)), rtol=RTOL32)
    np.testing.assert_allclose(m["log_odds_ratio"], ratio.mean(), rtol=RTOL32)
    np.testing.assert_allclose(m["accuracy"], np.mean(ratio > 0), rtol=RTOL32)
    a = jnp.log(jnp.array([0.5]))  # odds 1 on both sides: λ·log 2 + nll log 2
    np.testing.assert_allclose(orpo_loss(a, a, jnp.ones(1), jnp.ones(1), -a, lam=1.0)[0], 2 * LOG2, rtol=RTOL32)
    check_grad(lambda p: orpo_loss(p, jnp.asarray(pl, p.dtype), lw, ll, -p / lw, lam=0.25)[0], pw)
