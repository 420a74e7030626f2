"""LoRA and QLoRA: adapters-only training, the base as reference, PEFT and merged exports, quantization."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from jaxalign import models, training
from jaxalign.models import lora, peft
from tests._hf_models import build_hf_lm

CFG = lora.LoraConfig(rank=4, alpha=8.0)


def _randomize_adapters(model, seed):
    """Non-zero B (and fresh A), so the adapters change the output."""
    key = jax.random.key(seed)
    for i, (_, v) in enumerate(sorted(nnx.iter_graph(model), key=lambda p: str(p[0]))):
        if isinstance(v, lora.LoraParam):
            v[...] = 0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v[...].dtype)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny random Llama saved as Hugging Face, loaded, with random rank-4 adapters on every target."""
    d = tmp_path_factory.mktemp("lora")
    build_hf_lm("llama", d / "base", seed=3)
    model, _ = models.load_hf(d / "base")
    tokens = np.random.default_rng(0).integers(3, 96, size=(2, 10)).astype(np.int32)
    base_logits = np.asarray(model(tokens))
    lora.attach_lora(model, CFG, rngs=nnx.Rngs(1))
    _randomize_adapters(model, 7)
    return {"dir": d, "model": model, "tokens": tokens, "base_logits": base_logits,
            "logits": np.asarray(model(tokens))}


def _torch_logits(hf, tokens):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_adapters_change_the_output_and_adapters_off_is_the_base_exactly(adapted):
    model, tokens = adapted["model"], adapted["tokens"]
    assert np.abs(adapted["logits"] - adapted["base_logits"]).max() > 0.1
    with lora.adapters_off(model):
        np.testing.assert_array_equal(np.asarray(model(tokens)), adapted["base_logits"])
    np.testing.assert_array_equal(np.asarray(model(tokens)), adapted["logits"])  # switched back on
    fresh = models.load_hf(adapted["dir"] / "base")[0]
    lora.attach_lora(fresh, CFG, rngs=nnx.Rngs(5))  # B = 0: an adapted model starts as its base
    np.testing.assert_array_equal(np.asarray(fresh(tokens)), adapted["base_logits"])


def test_merged_export_loads_in_transformers_with_the_same_logits(adapted, tmp_path):
    peft.save_merged(adapted["model"], tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(_torch_logits(hf, adapted["tokens"]), adapted["logits"], atol=1e-4, rtol=0)


def test_peft_adapter_loads_in_peft_with_the_same_logits(adapted, tmp_path):
    from peft import PeftModel

    out = peft.save_peft_adapter(adapted["model"], tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    base = transformers.AutoModelForCausalLM.from_pretrained(str(adapted["dir"] / "base")).eval()
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    np.testing.assert_allclose(_torch_logits(tuned, adapted["tokens"]), adapted["logits"], atol=1e-4, rtol=0)


def _lm_loss(model, batch, rng):
    logits = model(batch["tokens"])[:, :-1]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    return nll.sum(), {}


def test_peft_import_continues_training_only_the_adapters(adapted, tmp_path):
    path = peft.save_peft_adapter(adapted["model"], tmp_path / "adapter")
    model = models.load_hf(adapted["dir"] / "base")[0]
    lora.attach_lora(model, CFG, rngs=nnx.Rngs(11))
    peft.load_peft_adapter(model, path)
    tokens = adapted["tokens"]
    np.testing.assert_allclose(np.asarray(model(tokens)), adapted["logits"], atol=1e-6, rtol=0)

    opt = optax.adam(1e-2)
    state, model_def = training.init_train_state(model, opt)
    adapters = nnx.to_pure_dict(nnx.state(model, lora.LoraParam))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_all = sum(x.size for x in jax.tree.leaves(state.params))
    assert 0 < n_adapter < n_all / 4
    # Adam's two moments cover the adapters only (plus its step count).
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * n_adapter + 1
    step = training.make_train_step(_lm_loss, opt, model_def=model_def, shardings=training.state_shardings(state),
                                    split_update=True)
    batch = {"tokens": tokens}
    gradient, _ = step.lower(state, batch)
    grads = gradient.out_info[0]
    grad_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)}
    assert grad_paths == {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    before = jax.tree.map(np.asarray, state.params)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    after = jax.tree.map(np.asarray, state.params)
    trained, frozen = model_def.split_trainable(after)
    trained0, frozen0 = model_def.split_trainable(before)
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen0)  # the base never moves
    assert all(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(trained0)))
    assert losses[-1] < losses[0]


def _blocks64(w, axis):
    return np.moveaxis(w, axis, -1).reshape(-1, 64)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_blockwise_quantization_error_is_within_its_bound(kind):
    w = np.random.default_rng(1).standard_t(4, size=(3, 128, 5)).astype(np.float32)  # heavy tails
    codes, absmax = lora.quantize(jnp.asarray(w), kind, axis=1)
    deq = np.asarray(lora.dequantize(codes, absmax, kind, axis=1), np.float64)
    blocks = _blocks64(w.astype(np.float64), 1)  # [blocks, 64] in float64
    amax = np.abs(blocks).max(1, keepdims=True)
    np.testing.assert_allclose(np.moveaxis(np.asarray(absmax), 1, -1).reshape(-1, 1), amax, rtol=1e-7)
    err = np.abs(_blocks64(deq, 1) - blocks)
    if kind == "int8":
        assert codes.dtype == jnp.int8 and codes.shape == w.shape
        assert np.all(err <= amax / 254 * (1 + 1e-5))
        ref = np.round(blocks / amax * 127) / 127 * amax
    else:
        assert codes.dtype == jnp.uint8 and codes.shape == (3, 64, 5)  # two 4-bit codes per byte
        levels = np.asarray(lora.NF4, np.float64)
        assert np.all(err <= amax * np.diff(levels).max() / 2 * (1 + 1e-5))
        ref = levels[np.abs(blocks[..., None] / amax[..., None] - levels).argmin(-1)] * amax
    np.testing.assert_allclose(_blocks64(deq, 1), ref, atol=1e-6 * amax.max(), rtol=0)


@pytest.mark.parametrize("kind", ["nf4"])  # int8 runs through the config in the DPO test
def test_qlora_forward_is_the_dequantized_base_plus_adapters(kind):
    cfg = models.tiny_config("llama")
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(16).reshape(2, 8) % cfg.vocab_size
    lora.attach_lora(model, CFG, rngs=nnx.Rngs(1))
    _randomize_adapters(model, 2)
    dense = np.asarray(model(tokens))
    lora.quantize_base(model, kind)
    q = model.layers.attn.q
    assert q[...].dtype == (jnp.int8 if kind == "int8" else jnp.uint8) and q.get_metadata()["frozen"]
    quantized = np.asarray(model(tokens))
    # The same weights dequantized once, in a plain float model: the forward must agree.
    np.testing.assert_allclose(np.asarray(lora.merged(model)(tokens)), quantized, atol=2e-5, rtol=0)
    assert 0 < np.abs(quantized - dense).max() < (0.05 if kind == "int8" else 0.5)


# ---------------------------------------------------------------------------------------------
# Through the config: experiments/train.py (DPO) and experiments/rl.py (GRPO) with model.lora.


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory):
    from tests._tokenizers import make_char_tokenizer

    d = tmp_path_factory.mktemp("lora_dpo")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(32):
        a, b = rng.integers(1, 9, size=2)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": "?"})
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_char_tokenizer(d / "tok")
    return d


def _dpo_config(d, workdir, steps):
    from experiments.configs import dpo_jsonl

    cfg = dpo_jsonl.get_config()
    cfg.unlock()
    cfg.workdir = str(workdir)
    cfg.model.tokenizer = str(d / "tok")
    cfg.model.lora = dict(rank=4, alpha=8.0, targets=["q", "v", "o", "down"], quantize="int8")
    cfg.data.update(dict(train=str(d / "pref.jsonl"), data_dir=str(d / "tfds"), max_length=16, batch_size=8,
                         buckets=16))
    cfg.algorithm.precompute_reference = False  # the reference is the base, adapters off, in the step
    cfg.train.update(dict(steps=steps, log_every=1, eval_every=0))
    cfg.checkpoint.every = 2
    cfg.optim.update(dict(lr=1e-2, total_steps=4, warmup_steps=0))
    return cfg


def test_qlora_dpo_through_the_config_learns_exports_and_resumes_exactly(pref_files, tmp_path):
    from experiments import train as entry

    out = entry.run(_dpo_config(pref_files, tmp_path / "full", steps=4))
    rows = out["rows"]
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # B = 0: the policy is its base at step 1
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    config = json.loads((tmp_path / "full" / "export_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "export"))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # Stopped after 2 steps and resumed from its checkpoint: the same adapters, bit for bit.
    entry.run(_dpo_config(pref_files, tmp_path / "resumed", steps=2))
    resumed = entry.run(_dpo_config(pref_files, tmp_path / "resumed", steps=4))
    assert [r["step"] for r in resumed["rows"]] == [3, 4]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(out["state"].params))


def test_lora_grpo_through_rl_py_keeps_the_base_as_reference(tmp_path):
    from experiments import rl
    from experiments.configs import grpo_arithmetic
    from jaxalign.tasks import arithmetic

    cfg = grpo_arithmetic.get_config()
    cfg.unlock()
    cfg.workdir = str(tmp_path)
    cfg.model.path = ""
    cfg.model.tokenizer = str(arithmetic.TOKENIZER_DIR)
    cfg.model.lora = dict(rank=4, alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"], quantize="none")
    cfg.task.update(dict(train_prompts=32, eval_prompts=8, eval_batch_size=8))
    cfg.algorithm.update(dict(prompts_per_step=4, group_size=2, beta=0.1))
    cfg.sampling.max_new_tokens = 4
    cfg.optim.lr = 1e-2
    cfg.train.update(dict(steps=2, log_every=1, eval_every=0))
    out = rl.run(cfg)
    rows = out["rows"]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its base
    assert rows[1]["kl"] > 0  # the adapters moved; the reference (adapters off) did not
    assert (tmp_path / "export_adapter" / "adapter_model.safetensors").is_file()
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))


def test_sharded_qlora_step_matches_one_device():
    """Adapters and int8 codes placed by the rules table (fsdp 4 × tensor 2) train as on one device."""
    from jaxalign import sharding as shd

    cfg = models.tiny_config("llama")
    batch = {"tokens": np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 12)).astype(np.int32)}

    def run(mesh):
        model = models.Transformer(cfg, rngs=nnx.Rngs(0))
        lora.attach_lora(model, CFG, rngs=nnx.Rngs(1))
        _randomize_adapters(model, 2)
        lora.quantize_base(model, "int8")
        opt = optax.adam(1e-2)
        state, model_def = training.init_train_state(shd.shard_model(model, mesh), opt, mesh=mesh)
        step = training.make_train_step(_lm_loss, opt, model_def=model_def, shardings=training.state_shardings(state))
        for _ in range(2):
            state, _ = step(state, batch)
        return state

    one = run(shd.make_mesh(shd.MeshConfig(), devices=jax.devices()[:1]))
    eight = run(shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2)))
    attn = eight.params["layers"]["attn"]
    assert tuple(attn["q_lora_a"].sharding.spec)[:2] == (None, "fsdp")
    assert tuple(attn["q"].sharding.spec)[:3] == (None, "fsdp", "tensor") and attn["q"].dtype == jnp.int8
    diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(),
                         jax.device_get(eight.params), jax.device_get(one.params))
    assert max(jax.tree.leaves(diffs)) <= 1e-5
