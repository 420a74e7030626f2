"""The entropy bonus of the policy losses and `token_logprobs_and_entropy`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import (
    cispo_loss,
    grpo_loss,
    gspo_loss,
    ppo_policy_loss,
    token_logprobs,
    token_logprobs_and_entropy,
)
from tests.test_losses_aggregation import ref_aggregate
from tests.test_losses_common import B, RTOL32, T, check_grad, right_padded_mask
from tests.test_losses_sft import V, ref_logprobs

# Each policy loss as f(lp, old, adv, mask, **kw), with the keywords that make
# its reductions differ from the others.
LOSSES = {
    "grpo": lambda lp, old, adv, mask, **kw: grpo_loss(lp, old, old, adv, mask, beta=0.04, **kw),
    "ppo": functools.partial(ppo_policy_loss, agg="seq-mean-token-sum-norm"),
    "gspo": functools.partial(gspo_loss, clip_eps_low=0.05, clip_eps_high=0.05),
    "cispo": functools.partial(cispo_loss, agg="seq-mean-token-sum"),
}
# How each one reduces the entropy (GSPO: the row token-mean, then rows).
ENTROPY_AGG = {"grpo": "seq-mean-token-mean", "ppo": "seq-mean-token-sum-norm", "gspo": "seq-mean-token-mean",
               "cispo": "seq-mean-token-sum"}


def _inputs(seed):
    rng = np.random.default_rng(seed)
    old = (-rng.random((B, T)) * 3).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * 0.2).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    entropy = (rng.random((B, T)) * 2).astype(np.float32)
    mask = right_padded_mask(rng, empty_row=1)
    return lp, old, adv, mask, np.where(mask > 0, entropy, np.nan).astype(np.float32)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_entropy_bonus(name):
    lp, old, adv, mask, entropy = _inputs(0)
    fn = LOSSES[name]
    base, base_metrics = fn(lp, old, adv, mask)
    assert "entropy" not in base_metrics

    # Coefficient 0: bit-identical loss and gradient, entropy still logged.
    zero, metrics = fn(lp, old, adv, mask, entropy=entropy, entropy_coef=0.0)
    np.testing.assert_array_equal(zero, base)
    np.testing.assert_array_equal(jax.grad(lambda x: fn(x, old, adv, mask, entropy=entropy)[0])(lp),
                                  jax.grad(lambda x: fn(x, old, adv, mask)[0])(lp))
    np.testing.assert_allclose(metrics["entropy"], np.nanmean(np.where(mask > 0, entropy, np.nan)), rtol=1e-5)

    # Coefficient c: L − c·agg(H), and ∂L/∂H = −c · the reduction's weights.
    agg = ENTROPY_AGG[name]
    with_bonus, _ = fn(lp, old, adv, mask, entropy=entropy, entropy_coef=0.01)
    want = float(base) - 0.01 * ref_aggregate(np.where(mask > 0, entropy, 0.0), mask, agg)
    np.testing.assert_allclose(with_bonus, want, rtol=RTOL32, atol=RTOL32)
    grad_h = jax.grad(lambda h: fn(lp, old, adv, mask, entropy=h, entropy_coef=0.01)[0])(entropy)
    assert np.all(np.isfinite(grad_h)) and np.all(np.asarray(grad_h)[mask == 0] == 0)
    expected_grad = np.array([[-0.01 * (ref_aggregate(np.eye(B * T)[b * T + t].reshape(B, T), mask, agg))
                               for t in range(T)] for b in range(B)])
    np.testing.assert_allclose(grad_h, expected_grad, rtol=1e-5, atol=1e-9)

    # Micro-batch parts stay exact with the bonus.
    num = den = 0.0
    for s in (slice(0, 2), slice(2, B)):
        (n, d), _ = fn(lp[s], old[s], adv[s], mask[s], entropy=entropy[s], entropy_coef=0.01, return_parts=True)
        num, den = num + n, den + d
    np.testing.assert_allclose(num / den, with_bonus, rtol=RTOL32)

    with pytest.raises(ValueError, match="entropy_coef=0.01 needs the per-token entropy"):
        fn(lp, old, adv, mask, entropy_coef=0.01)


def ref_entropy(logits):
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), axis=-1)


def test_token_logprobs_and_entropy():
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=(B, T, V))).astype(np.float32)
    logits[0, 0, 2] = -np.inf  # a banned token: p = 0, no NaN
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 0] = 3
    logps, entropy = jax.jit(token_logprobs_and_entropy)(logits, targets)
    np.testing.assert_array_equal(logps, token_logprobs(logits, targets))
    np.testing.assert_allclose(logps, ref_logprobs(logits, targets), rtol=RTOL32, atol=RTOL32)
    np.testing.assert_allclose(entropy, ref_entropy(logits), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(entropy))
    # Gradient of a weighted entropy sum against finite differences (float64).
    weights = rng.normal(size=(B, T))
    check_grad(lambda x: jnp.sum(token_logprobs_and_entropy(x, targets[1:])[1] * weights[1:]), logits[1:])
    grad = jax.grad(lambda x: jnp.sum(token_logprobs_and_entropy(x, targets)[1] * weights))(logits)
    assert np.all(np.isfinite(grad)) and float(grad[0, 0, 2]) == 0.0  # the banned token
    # Uniform logits: H = log V, the maximum.
    _, uniform = token_logprobs_and_entropy(jnp.zeros((1, 1, V)), jnp.zeros((1, 1), jnp.int32))
    np.testing.assert_allclose(uniform, [[np.log(V)]], rtol=RTOL32)
