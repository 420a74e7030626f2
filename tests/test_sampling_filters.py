"""Temperature / top-k / top-p: the distribution against transformers' warpers, and what the sampler draws."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from jaxalign.models import load_hf
from jaxalign.sampling import generate, sampling_logprobs
from tests._hf_models import build_hf_lm
from tests.test_sampling import TOL, left_padded_prompts, masked_max_diff, teacher_forced


def hf_logprobs(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    """transformers' sampling distribution (its warper order: temperature, top-k, top-p)."""
    scores = torch.tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.log_softmax(scores, dim=-1).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", list(itertools.product(
    [1.0, 0.6, 1.7], [None, 1, 5, 40], [None, 0.05, 0.5, 0.93])))
def test_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0.0, 2.0, size=(32, 50)).astype(np.float32)
    ours = np.asarray(sampling_logprobs(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    ref = hf_logprobs(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))  # the same kept set
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6, atol=1e-6)
    assert kept.sum(1).min() >= 1


def test_traced_k_and_p_equal_python_values():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 30)), jnp.float32)
    fn = jax.jit(lambda x, k, p: sampling_logprobs(x, temperature=0.8, top_k=k, top_p=p))
    np.testing.assert_array_equal(np.asarray(fn(logits, 7, 0.6)),
                                  np.asarray(sampling_logprobs(logits, temperature=0.8, top_k=7, top_p=0.6)))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A random model over 16 tokens: sharp enough that the filters cut real mass."""
    path = tmp_path_factory.mktemp("vocab16")
    build_hf_lm("llama", path, seed=4, vocab_size=16)
    model, cfg = load_hf(path)
    return model, cfg


ROWS = 1024


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (16, 0.7)])
def test_samples_stay_in_the_kept_set(small_vocab, top_k, top_p):
    """1024 samples of one prompt: nothing outside the set; first-token frequencies match."""
    model, cfg = small_vocab
    filters = dict(temperature=0.9, top_k=top_k, top_p=top_p)
    prompt = left_padded_prompts(cfg.vocab_size, (5,), seed=3)
    out = generate(model, *prompt, max_new_tokens=8, rng=jax.random.key(1), n=ROWS, **filters)
    ref, _ = teacher_forced(model, out, **filters)
    mask = np.asarray(out.mask).astype(bool)
    assert mask.all()  # no EOS given: every row runs the full budget
    assert np.isfinite(ref[mask]).all(), "a token outside the top-k/top-p set was sampled"
    assert masked_max_diff(out.logprobs, ref, mask) <= TOL

    first = sampling_logprobs(model(jnp.asarray(prompt[0]), attention_mask=jnp.asarray(prompt[1]))[0, -1], **filters)
    probs = np.exp(np.asarray(first, np.float64))
    freq = np.bincount(np.asarray(out.completions)[:, 0], minlength=cfg.vocab_size) / ROWS
    allowed = probs > 0
    assert 1 < allowed.sum() < cfg.vocab_size  # the filter is active and not trivial
    assert (freq[~allowed] == 0).all()
    sigma = np.sqrt(probs * (1 - probs) / ROWS)
    assert (np.abs(freq - probs) <= 4.5 * sigma + 1e-9).all(), (freq, probs)


def _draw_inputs():
    """Logits with the cases argmax has to get right: ties, -inf (filtered tokens), a NaN, all -inf but one."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 7, 53)).astype(np.float32) * 4
    x[0, :, 10] = x[0, :, 40] = 50.0  # a tie for the maximum: the first index wins
    x[1, :, ::3] = -np.inf  # top-k / top-p filtered tokens
    x[2, :, :] = -np.inf
    x[2, :, 17] = 0.0  # one token left
    x[3, 2, 30] = np.nan  # jnp.argmax counts a NaN as the largest value
    x[4] = np.round(x[4])  # many ties
    return jnp.asarray(x)


def test_argmax_first_equals_jnp_argmax():
    from jaxalign.sampling import argmax_first

    x = _draw_inputs()
    for arr in (x, x[0], x[:, 0]):  # [B, T, V], [T, V], [B, V]
        got = jax.jit(argmax_first)(arr)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(arr, axis=-1)))
    assert int(argmax_first(x)[3, 2]) == 30 and int(argmax_first(x)[0, 0]) == 10


def test_sample_categorical_draws_what_jax_random_categorical_draws():
    """Same key, same logits -> the same token as `jax.random.categorical`, for typed and legacy keys."""
    from jaxalign.sampling import sample_categorical

    x = _draw_inputs()
    x = jnp.where(jnp.isnan(x), 0.0, x)  # categorical over a NaN logit is undefined
    draw = jax.jit(sample_categorical)
    for seed in range(20):
        for key in (jax.random.key(seed), jax.random.PRNGKey(seed)):
            np.testing.assert_array_equal(np.asarray(draw(key, x)),
                                          np.asarray(jax.random.categorical(key, x, axis=-1)))
    assert bool((draw(jax.random.key(0), x)[2] == 17).all())  # the only token left is always drawn
    # A distribution, not a constant: 2,000 draws from [0.5, 0.3, 0.2] land within 4 sigma of it.
    p = np.array([0.5, 0.3, 0.2])
    tokens = np.asarray(draw(jax.random.key(7), jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (2000, 3))))
    freq = np.bincount(tokens, minlength=3) / tokens.size
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / tokens.size)), freq
