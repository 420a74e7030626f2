"""Chunked log-probs through the LM head (`jaxalign.models.logprobs.head_logprobs`): values and
gradients equal the whole-logits computation, and the compiled gradient holds far fewer bytes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import models
from jaxalign.algorithms import dpo, onpolicy, sft
from jaxalign.algorithms.rollout import SamplingConfig, make_logprob_fn
from jaxalign.models.logprobs import chunk_positions, head_logprobs

V, D = 96, 32
SMALL = dict(num_hidden_layers=1, hidden_size=D, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=V)
# The three ways `model.logits` ends: an untied head, the embedding transposed, and Gemma 2's
# tanh softcap (a cap of 0.3 makes tanh far from linear at these logit scales).
HEADS = {"untied": ("llama", {}), "tied": ("llama", {"tie_word_embeddings": True}),
         "softcap": ("gemma2", {"final_logit_softcapping": 0.3})}
TAU = 0.7


@pytest.fixture(scope="module", params=sorted(HEADS))
def head(request):
    family, over = HEADS[request.param]
    model = models.Transformer(models.tiny_config(family, **SMALL, **over), rngs=nnx.Rngs(0))
    return request.param, model


def weights_dv(model) -> np.ndarray:
    """The head's `[D, V]` matrix, read from the parameters (tied: the embedding transposed)."""
    if model.cfg.tie_embeddings:
        return np.asarray(model.embed[...], np.float64).T
    return np.asarray(model.lm_head[...], np.float64)


def reference_logits(model, hidden, tau):
    """Float64 NumPy: softcap(h W) / τ."""
    logits = np.asarray(hidden, np.float64) @ weights_dv(model)
    if model.cfg.final_softcap:
        logits = np.tanh(logits / model.cfg.final_softcap) * model.cfg.final_softcap
    return logits / tau


def reference(model, hidden, targets, tau):
    """Float64 NumPy: log-probs, entropies and argmax hits."""
    logits = reference_logits(model, hidden, tau)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    entropy = -(np.exp(logp) * logp).sum(-1)
    return picked, entropy, (logits.argmax(-1) == np.asarray(targets)).astype(np.float64)


def _objective(model, hidden, targets, w, chunk):
    logps, entropy, correct = head_logprobs(model, hidden, targets, temperature=TAU, logprob_chunk=chunk,
                                            entropy=True, correct=True)
    return jnp.sum(w[0] * logps) + jnp.sum(w[1] * entropy), (logps, entropy, correct)


_value_and_grad = jax.jit(nnx.value_and_grad(_objective, argnums=(0, 1), has_aux=True), static_argnums=4)


def test_chunk_positions():
    assert chunk_positions(0, rows=4, time=50, vocab=10**6) == 50  # 0: whole
    assert chunk_positions(7, rows=4, time=50, vocab=10) == 7
    assert chunk_positions(99, rows=4, time=50, vocab=10) == 50
    # None: the most positions whose [rows, chunk, V] float32 logits fit 256 MiB.
    assert chunk_positions(None, rows=8, time=4096, vocab=256_000) == 256 * 2**20 // (4 * 8 * 256_000) == 32
    with pytest.raises(ValueError, match="logprob_chunk must be"):
        chunk_positions(-1, rows=1, time=2, vocab=2)


def test_chunked_equals_full_values_and_gradients(head):
    """Chunks of 3 over T = 7 (the last chunk padded), τ = 0.7: log-probs, entropies, argmax hits and
    the gradients w.r.t. the hidden states and the head's weights equal the whole computation
    within 1e-6, and both match a float64 NumPy reference."""
    name, model = head
    kh, ky, kw = jax.random.split(jax.random.PRNGKey(1), 3)
    hidden = 4.0 * jax.random.normal(kh, (3, 7, D))
    targets = np.array(jax.random.randint(ky, (3, 7), 0, V))
    # Every other target is the most likely token, so the argmax hits are a mix of 0 and 1.
    targets[:, ::2] = reference_logits(model, hidden, TAU).argmax(-1)[:, ::2]
    targets = jnp.asarray(targets)
    w = jax.random.normal(kw, (2, 3, 7))
    (v_full, out_full), (g_model_full, g_h_full) = _value_and_grad(model, hidden, targets, w, 0)
    (v_chunk, out_chunk), (g_model_chunk, g_h_chunk) = _value_and_grad(model, hidden, targets, w, 3)

    np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-6, atol=1e-6)
    for a, b in zip(out_chunk, out_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_h_chunk), np.asarray(g_h_full), rtol=1e-6, atol=1e-6)
    head_param = "embed" if model.cfg.tie_embeddings else "lm_head"
    g_w_chunk, g_w_full = (np.asarray(g[head_param][...]) for g in (g_model_chunk, g_model_full))
    assert np.abs(g_w_full).max() > 1e-2  # the head's gradient is not trivially zero
    # 1e-6 relative: these entries reach ~25, where one float32 step is 1.9e-6.
    np.testing.assert_allclose(g_w_chunk, g_w_full, rtol=1e-6, atol=1e-6)

    want = reference(model, hidden, targets, TAU)
    for got, ref in zip(out_chunk, want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=2e-5)
    if name == "untied":
        # d/dW Σ w·log p = Σ_t h_t ⊗ w_t (onehot(y_t) − p_t) / τ, written out in float64.
        logits = np.asarray(hidden, np.float64) @ weights_dv(model) / TAU
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        onehot = np.eye(V)[np.asarray(targets)]
        dlogits = np.asarray(w[0], np.float64)[..., None] * (onehot - p) / TAU
        # and of Σ w'·H: dH/dl = −p (log p + H) per position (then / τ).
        logp = np.log(p)
        ent = -(p * logp).sum(-1, keepdims=True)
        dlogits += np.asarray(w[1], np.float64)[..., None] * (-p * (logp + ent)) / TAU
        want_w = np.einsum("btd,btv->dv", np.asarray(hidden, np.float64), dlogits)
        np.testing.assert_allclose(g_w_chunk, want_w, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = models.Transformer(models.tiny_config("llama", **SMALL), rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    b, t = 4, 11
    tokens = rng.integers(0, V, (b, t)).astype(np.int32)
    attention = np.ones((b, t), np.int32)
    attention[0, :3] = 0  # one left-padded row
    loss_mask = np.zeros((b, t), np.int32)
    loss_mask[:, 5:] = 1
    batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask,
             "positions": np.maximum(np.cumsum(attention, 1) - 1, 0).astype(np.int32)}
    return model, {k: jnp.asarray(v) for k, v in batch.items()}


def _assert_same(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def test_frozen_model_logprobs_chunked_equal_full(tiny):
    """`make_logprob_fn` (the reference and old log-probs of the on-policy driver, DPO's reference
    through `response_logprobs`), τ = 1.3, chunks of 4 over T − 1 = 10 and over the last 6 columns."""
    model, batch = tiny
    params = nnx.state(model, nnx.Param)
    full, chunked = (make_logprob_fn(model, temperature=1.3, logprob_chunk=c) for c in (0, 4))
    for last in (None, 6):
        want = np.asarray(full(params, batch, last=last))
        assert want.shape == (4, 10 if last is None else last)
        np.testing.assert_allclose(np.asarray(chunked(params, batch, last=last)), want, rtol=1e-6, atol=1e-6)


def test_sft_dpo_and_policy_losses_chunked_equal_full(tiny):
    """The algorithms' losses with `logprob_chunk=3` equal `logprob_chunk=0`: value, metrics and the
    gradient w.r.t. every parameter of the model, for SFT (with its token accuracy), DPO with the
    RPO term, and GRPO at τ = 0.8 with an entropy bonus (the entropy chunked too)."""
    model, batch = tiny
    rng = np.random.default_rng(1)
    n = 5
    sampling = SamplingConfig(max_new_tokens=n, temperature=0.8)
    acfg = onpolicy.preset("grpo", group_size=2, prompts_per_step=2, entropy_coef=0.1)
    rl = {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"], "positions": batch["positions"],
          **{k: jnp.asarray(rng.normal(size=(4, n)) - (2 if k != "advantages" else 0), jnp.float32)
             for k in ("old_logps", "ref_logps", "advantages")},
          "mask": jnp.asarray(rng.integers(0, 2, (4, n)), jnp.float32)}
    half = {f"{s}_{k}": v[sl] for s, sl in (("chosen", slice(0, 2)), ("rejected", slice(2, 4)))
            for k, v in batch.items()}
    half.update(ref_chosen_logps=jnp.array([-30.0, -31.0]), ref_rejected_logps=jnp.array([-29.0, -33.0]))
    losses = {
        "sft": (lambda c: functools.partial(sft.sft_loss_fn, logprob_chunk=c), batch),
        "dpo": (lambda c: dpo.make_dpo_loss_fn(dpo.DPOConfig(rpo_alpha=0.5), logprob_chunk=c), half),
        "grpo": (lambda c: onpolicy.make_loss_fn(acfg, sampling, logprob_chunk=c), rl),
    }
    for name, (make, b) in losses.items():
        def f(m, chunk, make=make, b=b):
            (num, den), metrics = make(chunk)(m, b, None)
            return num / den, metrics

        fn = jax.jit(nnx.value_and_grad(f, has_aux=True), static_argnums=1)
        (v0, m0), g0 = fn(model, 0)
        (v3, m3), g3 = fn(model, 3)
        np.testing.assert_allclose(float(v3), float(v0), rtol=1e-6, err_msg=name)
        _assert_same(m3, m0, f"{name} metric")
        _assert_same(g3, g0, f"{name} grad")
        if name == "grpo":
            assert float(m0["entropy"]) > 0
        if name == "sft":
            assert 0 <= float(m0["token_accuracy"]) <= 1


def test_chunked_gradient_needs_far_less_temporary_memory():
    """The compiled gradient at V = 16,384, 4 × 256 positions: whole logits need ≥ 4 · 64 MiB of
    temporaries (logits, exponentials, cotangents); chunks of 16 positions (4 MiB of logits) a
    fraction of that. XLA's own memory analysis, compile only."""
    model = models.Transformer(models.tiny_config("llama", **{**SMALL, "vocab_size": 16_384}), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    hidden = jax.ShapeDtypeStruct((4, 256, D), jnp.float32)
    targets = jax.ShapeDtypeStruct((4, 256), jnp.int32)

    def temp_bytes(chunk):
        def loss(params, hidden, targets):
            return jnp.sum(head_logprobs(nnx.merge(graphdef, params), hidden, targets, logprob_chunk=chunk))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, hidden, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(16)
    logits_bytes = 4 * 256 * 16_384 * 4
    assert full >= logits_bytes, (full, chunked)
    assert chunked * 8 < full, (full, chunked)
