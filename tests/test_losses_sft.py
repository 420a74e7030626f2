"""token_logprobs and sft_loss."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses import sft_loss, token_logprobs
from tests.test_losses_common import B, RTOL32, T, check_grad, right_padded_mask

V = 7


def ref_logprobs(logits, targets):
    logits = np.asarray(logits, np.float64)
    out = np.zeros(targets.shape)
    for b, t in np.ndindex(targets.shape):
        row = logits[b, t]
        out[b, t] = row[targets[b, t]] - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
    return out


def _inputs(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    return logits, targets, right_padded_mask(rng)


def test_token_logprobs_matches_reference():
    logits, targets, _ = _inputs()
    got = jax.jit(token_logprobs)(logits, targets)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_logprobs(logits, targets), rtol=RTOL32, atol=RTOL32)


def test_token_logprobs_hand_computed_and_stable():
    assert np.isclose(float(token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]]))[0, 0]), -np.log(4))
    # Huge logits: a naive exp would overflow; the max-shifted form is exact
    # (integers + 1e4 are exact in float32, so the shift loses nothing).
    small = np.array([[[2.0, 1.0, 0.0, -3.0]]], np.float32)
    got = token_logprobs(jnp.asarray(small + 1e4), jnp.array([[1]]))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref_logprobs(small, np.array([[1]])), rtol=RTOL32)


def test_token_logprobs_upcasts_bf16():
    logits, targets, _ = _inputs(1)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = token_logprobs(bf16, targets)
    assert got.dtype == jnp.float32
    # The bf16 values themselves, upcast exactly, are the reference.
    ref = ref_logprobs(np.asarray(bf16.astype(jnp.float32)), targets)
    np.testing.assert_allclose(got, ref, rtol=RTOL32, atol=RTOL32)


def test_sft_loss_matches_reference_and_metrics():
    logits, targets, mask = _inputs(2)
    loss, metrics = jax.jit(sft_loss)(logits, targets, mask)
    nll = -ref_logprobs(logits, targets)
    np.testing.assert_allclose(loss, np.sum(nll * mask) / mask.sum(), rtol=RTOL32)
    correct = np.argmax(logits, -1) == targets
    np.testing.assert_allclose(metrics["accuracy"], np.sum(correct * mask) / mask.sum(), rtol=RTOL32)
    assert float(metrics["tokens"]) == mask.sum()


def test_sft_loss_uniform_logits_is_log_vocab():
    loss, _ = sft_loss(jnp.zeros((2, 3, V)), jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)))
    np.testing.assert_allclose(loss, np.log(V), rtol=RTOL32)


def test_sft_loss_gradient_and_padding_independence():
    logits, targets, mask = _inputs(3, scale=1.0)
    grad = check_grad(lambda lg: sft_loss(lg, targets, mask)[0], logits)
    # Padded positions get no gradient; valid ones do.
    assert np.all(grad[mask == 0] == 0)
    assert np.all(np.abs(grad[mask == 1]).sum(-1) > 0)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    # d log p(y) / d logits = onehot(y) - softmax(logits), hand-derived, in float64 NumPy;
    # the cotangent weights every position differently so a misplaced row would show.
    logits, targets, _ = _inputs(4)
    weights = np.random.default_rng(5).normal(size=targets.shape)
    grad = jax.jit(jax.grad(lambda lg: jnp.sum(token_logprobs(lg, targets) * weights)))(logits)
    x = np.asarray(logits, np.float64)
    soft = np.exp(x - x.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    want = (np.eye(V)[targets] - soft) * weights[..., None]
    np.testing.assert_allclose(grad, want, rtol=RTOL32, atol=RTOL32)
