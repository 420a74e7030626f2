"""The sampler against teacher forcing: log-probs, masks, EOS, n samples, keys, compiles, sharding."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding as shd
from jaxalign.models import abstract_hf, load_hf
from jaxalign.sampling import Sampler, bucket_length, compile_stats, generate, sampling_logprobs, token_logprobs
from tests._hf_models import build_hf_lm

TOL = 1e-5
EOS = 2  # the tiny Hugging Face models' eos_token_id
LENGTHS = (3, 7, 5, 10)  # real prompt tokens per row; left-padded to 10
MAX_NEW = 12


def left_padded_prompts(vocab: int, lengths, seed: int = 0, pad_id: int = 0):
    """Tokens and mask `[B, max(lengths)]`, real tokens right-aligned."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(3, vocab, size=n)
        mask[i, width - n:] = 1
    return tokens, mask


def teacher_forced(model, result, **filters):
    """Log-probs `[R, N]` of the completion tokens recomputed by one full forward pass.

    Returns (filtered log-probs with `filters` = temperature/top_k/top_p, plain log-softmax).
    """
    tokens, mask = result.sequences()
    width = result.prompts.shape[1]
    logits = model(tokens, attention_mask=mask)[:, width - 1:-1]  # the logits that produced each completion token
    filtered = token_logprobs(sampling_logprobs(logits, **filters), result.completions)
    raw = token_logprobs(jax.nn.log_softmax(logits, axis=-1), result.completions)
    return np.asarray(filtered), np.asarray(raw)


def masked_max_diff(a, b, mask) -> float:
    valid = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_lm("llama", path, seed=3)
    model, cfg = load_hf(path)
    return model, cfg, path


@pytest.fixture(scope="module")
def prompts(llama):
    _, cfg, _ = llama
    return left_padded_prompts(cfg.vocab_size, LENGTHS, seed=1)


def eos_from_trajectories(model, prompts, **options):
    """Two token ids that end rows at different steps: picked from a first run.

    Row r's draw at column t depends only on (key, r, t) and the row's own
    history, so with these ids as EOS the rows follow the same trajectories
    and stop at the first occurrence.
    """
    first = generate(model, *prompts, max_new_tokens=MAX_NEW, eos_ids=(EOS, EOS), **options)
    tokens = np.asarray(first.completions)
    return int(tokens[0, 2]), int(tokens[5, 6])


def check_stops(result, eos_ids, pad_id=0):
    """EOS is the last masked-in token; after it pad_id with mask 0; lengths and truncated agree."""
    tokens, mask = np.asarray(result.completions), np.asarray(result.mask)
    lengths, truncated = np.asarray(result.lengths), np.asarray(result.truncated)
    np.testing.assert_array_equal(lengths, mask.sum(1))
    for row in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[row], eos_ids) & (mask[row] == 1))
        stop = hits[0] + 1 if len(hits) else tokens.shape[1]
        assert lengths[row] == stop and truncated[row] == (len(hits) == 0)
        np.testing.assert_array_equal(mask[row], np.arange(tokens.shape[1]) < stop)
        assert (tokens[row, stop:] == pad_id).all()
        assert (np.asarray(result.logprobs)[row, stop:] == 0).all()
    return lengths


SETTINGS = {
    "plain": dict(temperature=1.0),
    "filtered": dict(temperature=0.7, top_k=20, top_p=0.9),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_logprobs_equal_teacher_forcing(llama, prompts, setting):
    """Reported log-probs = the sampled distribution recomputed over [prompt ; completion]."""
    model, _, _ = llama
    filters = SETTINGS[setting]
    options = dict(rng=jax.random.key(7), n=2, return_raw_logprobs=True, **filters)
    eos_ids = eos_from_trajectories(model, prompts, **options)
    result = generate(model, *prompts, max_new_tokens=MAX_NEW, eos_ids=eos_ids, **options)
    lengths = check_stops(result, eos_ids)
    assert len(set(lengths.tolist())) >= 3 and lengths.max() == MAX_NEW, lengths  # stops at different steps
    np.testing.assert_array_equal(np.asarray(result.prompt_index), np.repeat(np.arange(4), 2))
    assert np.isfinite(np.asarray(result.logprobs)).all()

    ref, ref_raw = teacher_forced(model, result, **filters)
    diff = masked_max_diff(result.logprobs, ref, result.mask)
    raw_diff = masked_max_diff(result.raw_logprobs, ref_raw, result.mask)
    print(f"{setting}: max |logprob - teacher forced| = {diff:.2e}, raw {raw_diff:.2e}")
    assert diff <= TOL and raw_diff <= TOL


def test_deterministic_for_a_key(llama, prompts):
    model, _, _ = llama
    run = lambda key: generate(model, *prompts, max_new_tokens=MAX_NEW, rng=jax.random.key(key), n=2,
                               return_raw_logprobs=True, eos_ids=(EOS, EOS))
    a, b, c = run(11), run(11), run(12)
    np.testing.assert_array_equal(np.asarray(a.completions), np.asarray(b.completions))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.completions) != np.asarray(c.completions)).mean() > 0.5


def test_n_samples_prefill_once_equals_tiled_prompts(llama, prompts):
    """n samples per prompt are rows i*n..i*n+n-1, same as repeating the prompts before prefill."""
    model, _, _ = llama
    options = dict(max_new_tokens=MAX_NEW, rng=jax.random.key(5), return_raw_logprobs=True, eos_ids=(EOS, EOS))
    grouped = generate(model, *prompts, n=2, **options)
    tiled = generate(model, *(np.repeat(x, 2, axis=0) for x in prompts), n=1, **options)
    np.testing.assert_array_equal(np.asarray(grouped.completions), np.asarray(tiled.completions))
    np.testing.assert_array_equal(np.asarray(grouped.prompts), np.asarray(tiled.prompts))
    assert masked_max_diff(grouped.logprobs, tiled.logprobs, grouped.mask) <= TOL
    # The two samples of one prompt differ (they are not copies of one draw).
    tokens = np.asarray(grouped.completions)
    assert (tokens[0::2] != tokens[1::2]).any(axis=1).all()


def test_top_k_one_and_tiny_top_p_are_greedy(llama, prompts):
    """k and p are traced values: these runs share the compiled program of the "filtered" setting."""
    model, cfg, _ = llama
    options = dict(max_new_tokens=MAX_NEW, eos_ids=(EOS, EOS), n=2, return_raw_logprobs=True)
    greedy = generate(model, *prompts, rng=jax.random.key(0), greedy=True, **options)
    before = compile_stats().count
    top_k = generate(model, *prompts, rng=jax.random.key(1), temperature=0.7, top_k=1, top_p=1.0, **options)
    top_p = generate(model, *prompts, rng=jax.random.key(2), temperature=0.7, top_k=cfg.vocab_size, top_p=1e-6,
                     **options)
    assert compile_stats().count - before <= 1
    check_stops(greedy, (EOS,))
    for other in (top_k, top_p):
        np.testing.assert_array_equal(np.asarray(other.completions), np.asarray(greedy.completions))
        np.testing.assert_array_equal(np.asarray(other.mask), np.asarray(greedy.mask))
        # One token kept: the distribution is a point mass.
        assert np.abs(np.asarray(other.logprobs)).max() == 0.0


def test_compiles_are_bounded_by_buckets(llama):
    """Prompt widths 3..13 share one bucket, so do budgets 9..16: one compile for all."""
    model, cfg, _ = llama
    sampler = Sampler(model)
    params = nnx.state(model, nnx.Param)
    before = compile_stats().count
    for i, (width, budget) in enumerate([(3, 9), (5, 16), (8, 12), (11, 10), (13, 16)]):
        tokens, mask = left_padded_prompts(cfg.vocab_size, (width, max(1, width - 2), 2), seed=i)
        out = sampler(params, tokens, mask, max_new_tokens=budget, rng=jax.random.key(i), temperature=0.9)
        assert out.completions.shape == (3, budget)
    assert compile_stats().count - before == 1
    assert [bucket_length(x) for x in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_pure_dict_params_like_a_train_state(llama, prompts):
    """The trainer's layout (`nnx.to_pure_dict`) runs the same program as the nnx.State."""
    model, _, _ = llama
    sampler = Sampler(model)
    options = dict(max_new_tokens=MAX_NEW, rng=jax.random.key(3), n=2, eos_ids=(EOS, EOS), return_raw_logprobs=True)
    a = sampler(nnx.state(model, nnx.Param), *prompts, **options)
    before = compile_stats().count
    b = sampler(nnx.to_pure_dict(nnx.state(model, nnx.Param)), *prompts, **options)
    assert compile_stats().count == before
    np.testing.assert_array_equal(np.asarray(a.completions), np.asarray(b.completions))
    with pytest.raises(ValueError, match="do not match"):
        sampler({"embed": jnp.zeros((3, 3))}, *prompts, **options)


def test_precompile_on_the_abstract_model_serves_the_loaded_params(llama, prompts):
    """`abstract_hf` + `Sampler.precompile` compile before any weight is read; the loaded params then run
    that program (no compile in the call) and sample what `generate` on the loaded model samples."""
    model, cfg, path = llama
    abstract, abstract_cfg = abstract_hf(path)
    assert abstract_cfg == cfg
    shapes = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    loaded = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert shapes and all(isinstance(x, jax.ShapeDtypeStruct) for x in shapes)
    assert [(x.shape, x.dtype) for x in shapes] == [(x.shape, x.dtype) for x in loaded]

    options = dict(max_new_tokens=MAX_NEW, n=2, eos_ids=(EOS,), top_p=0.9, return_raw_logprobs=True)
    sampler = Sampler(abstract)
    before = compile_stats().count
    sampler.precompile(*prompts[0].shape, **options)
    assert compile_stats().count == before + 1
    out = sampler(nnx.state(model, nnx.Param), *prompts, rng=jax.random.key(4), temperature=0.8, **options)
    assert compile_stats().count == before + 1  # the precompiled program
    ref = generate(model, *prompts, rng=jax.random.key(4), temperature=0.8, **options)
    for name in ("completions", "logprobs", "raw_logprobs", "mask"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)))
    # A budget in another bucket is another program: compiled at the call.
    sampler(nnx.state(model, nnx.Param), *prompts, rng=jax.random.key(4), **{**options, "max_new_tokens": 40})
    assert compile_stats().count == before + 2
    with pytest.raises(ValueError, match="shapes only"):
        sampler(nnx.state(abstract, nnx.Param), *prompts, rng=jax.random.key(4), **options)


@contextlib.contextmanager
def recorded_compiles():
    """A list that gets the duration of every XLA compile while the block runs."""
    compiles = []

    def listener(name, seconds, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_precompile_leaves_the_first_call_nothing_to_compile(llama, prompts):
    """Besides its program, a call runs small ops (the cut of the bucket-wide outputs to max_new_tokens,
    the prompts repeated n times), each an XLA program compiled at first use. `precompile` runs them on
    zeros, so the first call with the loaded params compiles nothing."""
    model, _, path = llama
    abstract, _ = abstract_hf(path)
    options = dict(max_new_tokens=11, n=3, eos_ids=(EOS,))  # shapes no other test samples with
    with recorded_compiles() as compiles:
        sampler = Sampler(abstract)
        sampler.precompile(*prompts[0].shape, **options)
        assert compiles, "precompile compiled nothing"
        del compiles[:]
        params = nnx.state(model, nnx.Param)
        out = sampler(params, *prompts, rng=jax.random.key(5), **options)
        assert compiles == []
        assert out.completions.shape == (12, 11) and out.prompts.shape == (12, prompts[0].shape[1])
        np.testing.assert_array_equal(np.asarray(out.prompts), np.repeat(prompts[0], 3, axis=0))
        # The check can fail: another budget in the same bucket runs the same program but cuts its
        # outputs to another width, which compiles at the call.
        sampler(params, *prompts, rng=jax.random.key(5), **{**options, "max_new_tokens": 9})
        assert compiles


def test_rejects_right_padding(llama, prompts):
    model, _, _ = llama
    tokens, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, tokens, mask[:, ::-1], max_new_tokens=4, rng=jax.random.key(0))


def test_sharded_params_and_batch_match_one_device(llama, prompts):
    """Params split over (fsdp, tensor), rows over (data, fsdp) on 8 CPU devices: same samples."""
    model, _, path = llama
    assert jax.device_count() == 8
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_model, _ = load_hf(path)
    shd.shard_model(sharded_model, mesh)
    params = nnx.state(sharded_model, nnx.Param)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    options = dict(max_new_tokens=MAX_NEW, rng=jax.random.key(9), n=2, eos_ids=(EOS, EOS), return_raw_logprobs=True,
                   **SETTINGS["filtered"])
    with jax.set_mesh(mesh):
        placed = shd.shard_batch(prompts, mesh)
        out = Sampler(sharded_model)(params, *placed, **options)
    assert len(out.completions.sharding.device_set) == 8
    ref = generate(model, *prompts, **options)
    np.testing.assert_array_equal(np.asarray(out.completions), np.asarray(ref.completions))
    diff = masked_max_diff(out.logprobs, ref.logprobs, ref.mask)
    print(f"sharded vs one device: max |logprob diff| = {diff:.2e}")
    assert diff <= TOL


def test_decode_reads_the_kv_cache_in_place(llama, prompts):
    """The cache is `[L, B, KV, S, Dh]`, the order the decode step's attention dots read, so the compiled
    program neither transposes nor copies the stacked cache. (Kept as `[B, S, KV, Dh]`, XLA transposed and
    copied every layer's keys and values at every decode step: half the speed at batch 32, docs/sampling.md.)"""
    from jaxalign.sampling import decoding

    model, cfg, _ = llama
    n = 2
    before = set(decoding._compiled)
    out = Sampler(model)(nnx.state(model, nnx.Param), *prompts, max_new_tokens=MAX_NEW, n=n, rng=jax.random.key(0))
    assert out.completions.shape == (prompts[0].shape[0] * n, MAX_NEW)
    new = set(decoding._compiled) - before
    assert len(new) == 1
    hlo = decoding._compiled[new.pop()].as_text()
    rows, width = prompts[0].shape[0] * n, prompts[0].shape[1]
    stacked = rf"f32\[{cfg.num_layers},{rows},{cfg.num_kv_heads},(\d+),{cfg.head_dim}\]"
    assert re.search(stacked, hlo)  # the cache is in the program
    copies = [m for m in re.finditer(stacked + r"\{[^}]*\} (transpose|copy)\(", hlo)
              if int(m[1]) >= width + MAX_NEW - 1]
    transposed = [m for m in re.finditer(rf"= f32\[{rows},(\d+),(\d+),{cfg.head_dim}\]\{{[^}}]*\}} transpose\(", hlo)
                  if int(m[1]) * int(m[2]) >= cfg.num_kv_heads * (width + MAX_NEW - 1)]
    assert not copies and not transposed, [m[0] for m in (copies + transposed)[:3]]


def test_cpu_sampler_options_reach_the_compiler_and_keep_the_samples(llama, prompts, monkeypatch):
    """On CPU the sampler compiles with XLA's classic element-wise code generator (a fraction of the
    emitters' host memory while compiling, docs/sampling.md). The options reach the compiler, are part
    of the program's key, and XLA's defaults (`JAXALIGN_XLA_DEFAULTS=1`) sample the same tokens with
    the same log-probs."""
    from jaxalign.host import sampler_compiler_options

    monkeypatch.delenv("JAXALIGN_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert sampler_compiler_options("cpu") == {"xla_cpu_use_fusion_emitters": False}
    assert sampler_compiler_options("gpu") is None and sampler_compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")  # the user's choice wins
    assert sampler_compiler_options("cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

    seen = []
    compile_ = jax.stages.Lowered.compile

    def recording(self, compiler_options=None, **kw):
        seen.append(compiler_options)
        return compile_(self, compiler_options, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", recording)
    model, _, _ = llama
    runs = {}
    for mode in ("jaxalign", "xla-defaults"):
        if mode == "xla-defaults":
            monkeypatch.setenv("JAXALIGN_XLA_DEFAULTS", "1")
        # 3 samples of 40 tokens: a program no other test compiles.
        runs[mode] = generate(model, *prompts, max_new_tokens=40, n=3, rng=jax.random.key(9), eos_ids=(EOS,),
                              return_raw_logprobs=True)
    assert seen == [{"xla_cpu_use_fusion_emitters": False}, None]
    a, b = runs["jaxalign"], runs["xla-defaults"]
    np.testing.assert_array_equal(np.asarray(a.completions), np.asarray(b.completions))
    assert masked_max_diff(a.logprobs, b.logprobs, a.mask) <= TOL
    assert masked_max_diff(a.raw_logprobs, b.raw_logprobs, a.mask) <= TOL


# Heterogeneous layers under the scan: Gemma 3's alternating sliding / full attention (each with its RoPE)
# and GPT-2's attention scaled by 1 / (layer + 1) come from per-layer tables indexed by the scanned layer.
HETEROGENEOUS = {
    "gemma3": ("gemma3_text", dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                   sliding_window=4)),
    "gpt2": ("gpt2", dict(n_layer=3, scale_attn_by_inverse_layer_idx=True)),
}


@pytest.mark.parametrize("case", sorted(HETEROGENEOUS))
def test_scanned_heterogeneous_layers_sample_what_teacher_forcing_scores(tmp_path, case):
    """Raw and filtered log-probs of the sampled tokens equal a full forward pass over [prompt ; completion],
    with rows that stop early, n samples and filters, on layers that differ by window, RoPE or scale."""
    variant, overrides = HETEROGENEOUS[case]
    build_hf_lm(variant, tmp_path, seed=2, **overrides)
    model, cfg = load_hf(tmp_path)
    prompts = left_padded_prompts(cfg.vocab_size, LENGTHS, seed=4)
    options = dict(rng=jax.random.key(3), n=2, return_raw_logprobs=True, **SETTINGS["filtered"])
    eos_ids = eos_from_trajectories(model, prompts, **options)
    result = generate(model, *prompts, max_new_tokens=MAX_NEW, eos_ids=eos_ids, **options)
    lengths = check_stops(result, eos_ids)
    assert lengths.min() < MAX_NEW  # rows stop early
    ref, ref_raw = teacher_forced(model, result, **SETTINGS["filtered"])
    assert masked_max_diff(result.logprobs, ref, result.mask) <= TOL
    assert masked_max_diff(result.raw_logprobs, ref_raw, result.mask) <= TOL


def test_sampler_program_does_not_grow_with_depth():
    """The layers are scanned: the sampler's compiled program for 12 layers is the size of the one for 2
    (it was ~2.1 MB of executable and ~0.45 s of compile per layer on XLA:CPU when they were unrolled)."""
    import dataclasses

    from jaxalign.models import Transformer, tiny_config
    from jaxalign.sampling import decoding

    sizes = {}
    for depth in (2, 12):
        cfg = dataclasses.replace(tiny_config(), num_layers=depth)
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        before = set(decoding._compiled)
        Sampler(model).precompile(2, 8, max_new_tokens=4)
        (key,) = set(decoding._compiled) - before
        sizes[depth] = len(decoding._compiled[key].as_text())
    assert sizes[12] < 1.05 * sizes[2], sizes


def test_bfloat16_cache_is_half_the_bytes_and_tracks_float32(llama, prompts):
    """`Sampler(cache_dtype=bf16)`: the program holds a bf16 cache, and with the same draws the raw log-probs
    stay within bf16 rounding of the float32 cache's (keys/values rounded to 8 bits of mantissa)."""
    model, cfg, _ = llama
    params = nnx.state(model, nnx.Param)
    options = dict(max_new_tokens=MAX_NEW, rng=jax.random.key(4), n=2, greedy=True, return_raw_logprobs=True)
    ref = Sampler(model)(params, *prompts, **options)
    sampler = Sampler(model, cache_dtype=jnp.bfloat16)
    out = sampler(params, *prompts, **options)
    static, args, _ = sampler._prepare(params, *prompts, rng=jax.random.key(4), temperature=1.0, top_k=None,
                                       top_p=None, eos_ids=(), pad_id=0, **{k: options[k] for k in
                                                                            ("max_new_tokens", "n", "greedy",
                                                                             "return_raw_logprobs")})
    hlo = sampler._executable(static, args).as_text()
    rows = prompts[0].shape[0] * 2
    assert re.search(rf"bf16\[{cfg.num_layers},{rows},{cfg.num_kv_heads},\d+,{cfg.head_dim}\]", hlo)
    same = np.asarray(out.completions) == np.asarray(ref.completions)
    first_diff = np.where(same.all(1), MAX_NEW, np.argmin(same, axis=1))  # compare up to the first divergence
    valid = np.arange(MAX_NEW)[None] < first_diff[:, None]
    assert valid.sum() >= rows * 3
    diff = np.abs(np.asarray(out.raw_logprobs) - np.asarray(ref.raw_logprobs))[valid].max()
    assert 0 < diff <= 0.05, diff


def test_segmented_cache_samples_what_teacher_forcing_scores(llama, prompts):
    """A 70-token budget (buffer 128) decodes in 4 segments whose caches grow from 32 to 128 columns past
    the prompts: log-probs still equal a full forward pass, and rows stop where their EOS is."""
    from jaxalign.sampling.sampler import cache_segments

    width = prompts[0].shape[1]
    assert [s for _, s in cache_segments(16, 128)] == [16 + 31, 16 + 63, 16 + 95, 16 + 128]
    assert cache_segments(16, 16) == [(16, 32)]
    model, _, _ = llama
    options = dict(rng=jax.random.key(11), n=2, return_raw_logprobs=True, **SETTINGS["filtered"])
    result = generate(model, *prompts, max_new_tokens=70, eos_ids=(EOS,), **options)
    ref, ref_raw = teacher_forced(model, result, **SETTINGS["filtered"])
    assert np.asarray(result.mask).sum() > 70 * 2 and width > 0  # rows run past the first segments
    assert masked_max_diff(result.logprobs, ref, result.mask) <= TOL
    assert masked_max_diff(result.raw_logprobs, ref_raw, result.mask) <= TOL
    check_stops(result, (EOS,))
