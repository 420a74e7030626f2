"""IS corrections for the sampler/trainer mismatch (none, tis, mis) and the
mismatch metrics, against float64 NumPy references."""

import functools

import jax
import numpy as np
import pytest

from jaxalign.losses import (
    IS_CORRECTIONS,
    grpo_loss,
    gspo_loss,
    importance_correction,
    mis_mask,
    mismatch_metrics,
    tis_weights,
)
from tests.test_losses_common import B, RTOL32, T, right_padded_mask
from tests.test_losses_ppo import ref_policy_per_token
from tests.test_losses_sequence import ref_gspo


def _inputs(seed, scale=0.3):
    rng = np.random.default_rng(seed)
    old = (-rng.random((B, T)) * 3).astype(np.float32)
    sampler = (old + rng.normal(size=(B, T)) * scale).astype(np.float32)
    mask = right_padded_mask(rng)
    # Padding holds garbage, as a sampler's output past EOS may.
    return np.where(mask > 0, old, -np.inf).astype(np.float32), np.where(mask > 0, sampler, np.nan), mask


def ref_log_ratio(old, sampler, mask, level):
    delta = np.where(mask > 0, np.float64(np.where(mask > 0, old, 0)) - np.where(mask > 0, sampler, 0), 0.0)
    if level == "sequence":
        delta = np.repeat(delta.sum(axis=1, keepdims=True), delta.shape[1], axis=1)
    return delta


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_and_mis_match_reference(level):
    old, sampler, mask = _inputs(0, scale=0.4 if level == "token" else 0.25)
    delta = ref_log_ratio(old, sampler, mask, level)
    weights = jax.jit(functools.partial(tis_weights, is_cap=1.25, is_level=level))(old, sampler, mask)
    np.testing.assert_allclose(weights, np.where(mask > 0, np.minimum(np.exp(delta), 1.25), 0.0), rtol=1e-5)
    kept = jax.jit(functools.partial(mis_mask, is_cap=1.25, is_level=level))(old, sampler, mask)
    want = mask * ((np.exp(delta) >= 1 / 1.25) & (np.exp(delta) <= 1.25))
    np.testing.assert_array_equal(kept, want)
    # The inputs exercise every case: ratios above C and below 1/C, and some kept.
    valid = mask > 0
    assert np.any((np.exp(delta) > 1.25) & valid) and np.any((np.exp(delta) < 0.8) & valid)
    assert 0 < want.sum() < mask.sum()


def test_equal_logprobs_give_weights_exactly_one():
    old, _, mask = _inputs(1)
    sampler = old.copy()  # same program, same float32 values (garbage padding included)
    sampler[mask == 0] = np.nan
    for name in sorted(IS_CORRECTIONS):
        for level in ("token", "sequence"):
            w, kept, metrics = importance_correction(old, sampler, mask, is_correction=name, is_cap=1.0,
                                                     is_level=level)
            assert np.all(np.asarray(w)[mask > 0] == 1.0) and np.all(np.asarray(w)[mask == 0] == 0.0), name
            np.testing.assert_array_equal(kept, mask)
            assert float(metrics["mismatch_abs_max"]) == 0.0 == float(metrics["mismatch_kl_k3"])
            assert float(metrics["is_weight_mean"]) == 1.0 and float(metrics["is_masked_frac"]) == 0.0


def test_mismatch_metrics_match_reference():
    old, sampler, mask = _inputs(2)
    metrics = jax.jit(mismatch_metrics)(old, sampler, mask)
    delta = ref_log_ratio(old, sampler, mask, "token")[mask > 0]
    np.testing.assert_allclose(metrics["mismatch_abs_max"], np.abs(delta).max(), rtol=RTOL32)
    np.testing.assert_allclose(metrics["mismatch_abs_mean"], np.abs(delta).mean(), rtol=1e-5)
    # k3 with r = π_old/π_sampler.
    np.testing.assert_allclose(metrics["mismatch_kl_k3"], np.mean(np.exp(delta) - 1 - delta), rtol=1e-5)
    assert all(np.isfinite(v) for v in metrics.values())


def test_importance_correction_table_and_metrics():
    old, sampler, mask = _inputs(3)
    delta = ref_log_ratio(old, sampler, mask, "token")
    w, kept, metrics = importance_correction(old, sampler, mask, is_correction="tis", is_cap=1.2)
    np.testing.assert_array_equal(kept, mask)
    np.testing.assert_allclose(metrics["is_weight_mean"], np.minimum(np.exp(delta), 1.2)[mask > 0].mean(), rtol=1e-5)
    w, kept, metrics = importance_correction(old, sampler, mask, is_correction="mis", is_cap=1.2)
    inside = (np.abs(delta) <= np.log(1.2)) & (mask > 0)
    np.testing.assert_array_equal(kept, inside.astype(np.float32))
    np.testing.assert_array_equal(w, inside.astype(np.float32))
    np.testing.assert_allclose(metrics["is_masked_frac"], 1 - inside.sum() / mask.sum(), rtol=RTOL32)
    w, kept, _ = importance_correction(old, sampler, mask)  # none
    np.testing.assert_array_equal(w, mask)
    np.testing.assert_array_equal(kept, mask)
    with pytest.raises(ValueError, match="is_correction 'icepop'.*valid"):
        importance_correction(old, sampler, mask, is_correction="icepop")
    with pytest.raises(ValueError, match="is_cap must be >= 1"):
        importance_correction(old, sampler, mask, is_cap=0.5)
    with pytest.raises(ValueError, match="is_level 'row'"):
        tis_weights(old, sampler, mask, is_cap=2.0, is_level="row")


def test_weights_enter_the_policy_losses():
    """`is_weights` multiplies the policy-gradient term only (not the KL), and
    no gradient flows into it; GSPO weighs a row by its token-mean weight."""
    old, sampler, mask = _inputs(4)
    rng = np.random.default_rng(5)
    old = np.where(mask > 0, old, 0.0).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    ref = (lp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    w, kept, _ = importance_correction(old, sampler, mask, is_correction="tis", is_cap=1.5)
    fn = functools.partial(grpo_loss, beta=0.1, kl="k1", agg="token-mean")
    loss, _ = fn(lp, old, ref, adv, kept, is_weights=w)
    per_token = np.float64(w) * ref_policy_per_token(lp, old, adv, 0.2, 0.2) + 0.1 * (np.float64(lp) - ref)
    np.testing.assert_allclose(loss, np.sum(per_token * mask) / mask.sum(), rtol=1e-5)
    grad_w = jax.grad(lambda v: fn(lp, old, ref, adv, kept, is_weights=v)[0])(w)
    assert np.all(np.asarray(grad_w) == 0.0)
    # Weights of exactly 1 leave the loss bit-identical.
    ones = np.asarray(mask)
    np.testing.assert_array_equal(fn(lp, old, ref, adv, mask, is_weights=ones)[0], fn(lp, old, ref, adv, mask)[0])
    g_loss, _ = gspo_loss(lp, old, adv, mask, clip_eps_low=0.05, clip_eps_high=0.05, is_weights=w)
    np.testing.assert_allclose(g_loss, ref_gspo(lp, old, adv, mask, 0.05, 0.05, weights=w), rtol=1e-5, atol=1e-6)
