"""Every family against the transformers torch model: logits, export round trip, KV cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxalign.models import load_hf, save_hf
from tests._hf_models import VARIANTS, build_hf_lm, padded_batch, torch_logits

TOL = 1e-4


@nnx.jit
def _forward(model, tokens, mask, positions):
    return model(tokens, positions=positions, attention_mask=mask)


def _compare(ours, ref, mask):
    valid = mask.astype(bool)
    diff = float(np.abs(ours[valid] - ref[valid]).max())
    assert diff <= TOL, diff
    np.testing.assert_array_equal(ours[valid].argmax(-1), ref[valid].argmax(-1))
    return diff


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = build_hf_lm(request.param, path, seed=len(request.param))
    model, cfg = load_hf(path)
    return request.param, path, hf_model, model, cfg


def test_logits_match_transformers(variant):
    name, _, hf_model, model, cfg = variant
    tokens, mask, positions = padded_batch(cfg.vocab_size, seed=1)
    ref = torch_logits(hf_model, tokens, mask, positions)
    ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)))
    diff = _compare(ours, ref, mask)
    print(f"{name}: max |logits - transformers| = {diff:.2e}")


def test_default_positions_follow_the_mask(variant):
    """Without explicit positions, left padding is handled by counting real tokens."""
    _, _, _, model, cfg = variant
    tokens, mask, positions = padded_batch(cfg.vocab_size, seed=2)
    a = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    b = model(jnp.asarray(tokens), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_save_hf_reloads_in_transformers(variant, tmp_path):
    name, _, hf_model, model, cfg = variant
    save_hf(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                                 attn_implementation="eager").eval()
    tokens, mask, positions = padded_batch(cfg.vocab_size, seed=3)
    ref = torch_logits(hf_model, tokens, mask, positions)
    again = torch_logits(reloaded, tokens, mask, positions)
    np.testing.assert_allclose(again, ref, atol=1e-6)
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["model_type"] == cfg.family


@nnx.jit
def _prefill(model, tokens, mask, cache):
    return model(tokens, attention_mask=mask, cache=cache)


@nnx.jit
def _decode(model, token, cache):
    return model(token, cache=cache)


def test_kv_cache_decoding_equals_full_forward(variant):
    """Prefill 4 tokens, then feed one token at a time: every position's logits match."""
    _, _, _, model, cfg = variant
    tokens, mask, _ = padded_batch(cfg.vocab_size, seed=4, t=10)
    # Left padding only (generation layout): move row 1's padding to the front.
    tokens[1] = np.roll(tokens[1], 3)
    mask[1] = np.roll(mask[1], 3)
    full = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    cache = model.init_cache(batch=3, max_len=12)
    k = 6
    logits, cache = _prefill(model, jnp.asarray(tokens[:, :k]), jnp.asarray(mask[:, :k]), cache)
    steps = [np.asarray(logits)]
    for t in range(k, tokens.shape[1]):
        logits, cache = _decode(model, jnp.asarray(tokens[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(incremental[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert int(cache.index) == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1))


def test_bfloat16_parameters_track_float32(variant):
    _, path, _, model, cfg = variant
    bf16, _ = load_hf(path, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    tokens, mask, positions = padded_batch(cfg.vocab_size, seed=5)
    args = (jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions))
    a = np.asarray(_forward(model, *args))
    b = np.asarray(_forward(bf16, *args))
    valid = mask.astype(bool)
    scale = np.abs(a[valid]).max()
    # bf16 keeps 8 bits of mantissa: a few percent of the logit range after 2 layers.
    assert np.abs(a[valid] - b[valid]).max() <= 0.08 * scale
