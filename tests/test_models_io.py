"""Checkpoint I/O: reward heads, sharded files, corrupted checkpoints, refused configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxalign.models import (
    CheckpointError,
    Transformer,
    UnsupportedConfigError,
    ValueModel,
    config_from_hf,
    last_token_scores,
    load_hf,
    save_hf,
    tiny_config,
    with_value_head,
)
from tests._hf_models import build_hf_classifier, build_hf_lm, hf_config, padded_batch


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_lm("llama", path, seed=3)
    return path


def _scores_torch(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits[:, 0].numpy()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_reward_model_matches_sequence_classifier(name, tmp_path):
    """A 1-label *ForSequenceClassification checkpoint loads as a ValueModel with equal scores."""
    hf_model = build_hf_classifier(name, tmp_path / "rm", seed=7)
    model, _ = load_hf(tmp_path / "rm")
    assert isinstance(model, ValueModel)
    tokens, mask, _ = padded_batch(96, seed=8)
    tokens[2] = np.roll(tokens[2], -4)  # transformers pools the rightmost non-pad token: right padding
    mask[2] = np.roll(mask[2], -4)
    ref = _scores_torch(hf_model, tokens)
    ours = np.asarray(last_token_scores(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)),
                                        jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    save_hf(model, tmp_path / "rm2")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm2")).eval()
    np.testing.assert_allclose(_scores_torch(again, tokens), ref, atol=1e-5)


def test_value_head_is_zero_initialised_and_reward_head_is_not(llama_dir):
    lm, cfg = load_hf(llama_dir)
    value = with_value_head(lm)
    tokens = jnp.arange(1, 9).reshape(2, 4)
    np.testing.assert_array_equal(np.asarray(value(tokens)), 0.0)
    reward = with_value_head(lm, init="reward", rngs=nnx.Rngs(1))
    head = np.asarray(reward.head[...])
    assert head.shape == (cfg.hidden_size, 1)
    assert 0.5 / np.sqrt(cfg.hidden_size + 1) < head.std() < 2.0 / np.sqrt(cfg.hidden_size + 1)


def test_sharded_checkpoint_round_trip(llama_dir, tmp_path):
    model, _ = load_hf(llama_dir)
    save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again, _ = load_hf(tmp_path / "sharded")
    tokens = jnp.arange(1, 13).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(again(tokens)))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).eval()
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(model(tokens)), atol=1e-4)


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(llama_dir, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ".*missing"):
        load_hf(tmp_path / "bad")


def test_wrong_shape_is_named(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(llama_dir, tmp_path / "bad", lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + r" has shape \(15, 32\)"):
        load_hf(tmp_path / "bad")


def test_unexpected_tensor_is_refused(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.q_proj.bias"  # a bias the config says does not exist
    _rewrite(llama_dir, tmp_path / "bad", lambda t: t.__setitem__(name, np.zeros(32, np.float32)))
    with pytest.raises(CheckpointError, match="not used by this config"):
        load_hf(tmp_path / "bad")


def test_missing_shard_file_is_named(llama_dir, tmp_path):
    model, _ = load_hf(llama_dir)
    save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name + " named in the index is missing"):
        load_hf(tmp_path / "sharded")


@pytest.mark.parametrize("field,value,match", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type 'yarn'"),
    ("hidden_act", "mish", "activation 'mish'"),
    ("model_type", "mixtral", "model_type 'mixtral'"),
])
def test_unsupported_config_fields_are_refused(field, value, match):
    hf = hf_config("llama").to_dict()
    hf[field] = value
    with pytest.raises(UnsupportedConfigError, match=match):
        config_from_hf(hf)


def _word_tokenizer(n_words: int, path):
    vocab = {f"w{i}": i for i in range(n_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    fast.save_pretrained(str(path))
    return fast


def test_tokenizer_vocabulary_mismatch_is_refused(llama_dir, tmp_path):
    ok = _word_tokenizer(96, tmp_path / "ok")
    load_hf(llama_dir, tokenizer=ok)
    _word_tokenizer(200, tmp_path / "big")
    with pytest.raises(CheckpointError, match="200 tokens"):
        load_hf(llama_dir, tokenizer=tmp_path / "big")


def test_model_built_from_tiny_config_exports_to_transformers(tmp_path):
    cfg = tiny_config("qwen2", vocab_size=40)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    save_hf(model, tmp_path / "q")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    tokens = np.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(model(jnp.asarray(tokens))), atol=1e-4)


def test_every_parameter_has_logical_axes():
    for family in ["llama", "gemma2", "gpt2", "qwen3"]:
        model = with_value_head(Transformer(tiny_config(family), rngs=nnx.Rngs(0)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata().get("axes")
            assert axes is not None and len(axes) == var[...].ndim, (family, path, axes)


def test_load_hf_on_a_mesh_places_params_by_the_rules(llama_dir):
    import jax

    from jaxalign import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    model, cfg = load_hf(llama_dir, mesh=mesh)
    single, _ = load_hf(llama_dir)
    q = model.layers.attn.q[...]  # stacked: [L, D, H, Dh]
    assert q.shape[0] == cfg.num_layers
    assert q.sharding.spec == sharding.spec_for(("layers", "embed", "heads", "head_dim"), q.shape, mesh)
    assert q.sharding.spec[0] is None and q.sharding.spec[1] is not None
    assert len(q.sharding.device_set) == 8
    tokens = jnp.arange(1, 17).reshape(2, 8)
    with jax.set_mesh(mesh):
        sharded_logits = np.asarray(model(tokens))
    np.testing.assert_allclose(sharded_logits, np.asarray(single(tokens)), atol=1e-5)


def test_float64_model_computes_in_float64_throughout(llama_dir):
    """Norms, rotary embeddings, softmax and logits widen to the model's dtype: a float64
    model is a numerical reference (the float32 model agrees with it to float32 rounding)."""
    import jax

    tokens = jnp.arange(1, 17).reshape(2, 8)
    f32, _ = load_hf(llama_dir)
    ref32 = np.asarray(f32(tokens), np.float64)
    with jax.enable_x64(True):
        f64, _ = load_hf(llama_dir, dtype=jnp.float64)
        logits = f64(tokens)
        assert logits.dtype == jnp.float64
        again = np.asarray(logits)
    assert np.abs(again - ref32).max() < 1e-5
    assert np.abs(again - ref32).max() > 0  # not float32 in disguise


def test_safetensors_reader_equals_the_safetensors_library_and_refuses_short_files(tmp_path):
    import ml_dtypes

    from jaxalign.models.convert import CheckpointError, _SafetensorsFile

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
               "c": rng.integers(-9, 9, (2, 2, 2)).astype(np.int64), "d": np.zeros((0, 4), np.float16)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "np"})
    expected = load_file(str(tmp_path / "m.safetensors"))
    reader = _SafetensorsFile(tmp_path / "m.safetensors")
    assert set(reader.keys()) == set(tensors)
    for name, value in expected.items():
        got = reader.get(name)
        assert got.dtype == value.dtype and reader.shape(name) == value.shape
        np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8))  # bit-exact, bf16 included
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-4])  # the last tensor lost 4 bytes
    short = _SafetensorsFile(tmp_path / "short.safetensors")
    last = max(reader.entries, key=lambda k: reader.entries[k]["data_offsets"][1])
    with pytest.raises(CheckpointError, match=last):
        short.get(last)


def test_clone_model_owns_its_buffers_and_compiles_once():
    from jaxalign.models import clone_model, copy_tree

    model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[1, 5, 7, 2]], jnp.int32)
    expected = np.asarray(model(tokens))
    before = copy_tree._cache_size()
    clone = clone_model(model)
    originals = jax.tree.leaves(nnx.state(model))
    copies = jax.tree.leaves(nnx.state(clone))
    assert len(originals) == len(copies)
    for a, b in zip(originals, copies):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    clone_model(model)  # same tree structure: no second program
    assert copy_tree._cache_size() - before == 1
    for a in originals:  # as a donating train step would
        a.delete()
    np.testing.assert_array_equal(np.asarray(clone(tokens)), expected)
