"""Hugging Face safetensors checkpoints <-> jaxalign models, driven by one table per family.

A rule names a Hugging Face tensor, the jaxalign parameter it becomes, and the
pair of array transforms (import, export). GPT-2's fused `c_attn` is split by
`part` rules: each takes one slice of the last axis on import, and the slices
are concatenated back on export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.host import release_host_memory, resolve_local_path
from jaxalign.models.config import ModelConfig, config_from_hf
from jaxalign.models.heads import ValueModel
from jaxalign.models.transformer import Transformer

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # Hugging Face tensor name; `{i}` is the layer index, `{p}` the backbone prefix
    ours: str  # jaxalign parameter path, dot-separated
    to_ours: Callable  # (array, cfg) -> array
    to_hf: Callable  # (array, cfg) -> array
    part: tuple[int, int] | None = None  # (index, count) along the last Hugging Face axis


def _copy(x, c):
    return x


def _t(x, c):
    return x.T


def _in_heads(n: str):
    def to_ours(x, c):  # [n * Dh, D] -> [D, n, Dh]
        return x.T.reshape(c.hidden_size, getattr(c, n), c.head_dim)

    def to_hf(x, c):
        return x.reshape(c.hidden_size, -1).T

    return to_ours, to_hf


def _bias_heads(n: str):
    return (lambda x, c: x.reshape(getattr(c, n), c.head_dim)), (lambda x, c: x.reshape(-1))


def _out_heads_linear():  # [D, H * Dh] -> [H, Dh, D]
    return (lambda x, c: x.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
            lambda x, c: x.reshape(-1, c.hidden_size).T)


def _out_heads_conv():  # GPT-2 Conv1D [H * Dh, D] -> [H, Dh, D]
    return (lambda x, c: x.reshape(c.num_heads, c.head_dim, c.hidden_size),
            lambda x, c: x.reshape(-1, c.hidden_size))


def _conv_heads():  # GPT-2 Conv1D slice [D, H * Dh] -> [D, H, Dh]
    return (lambda x, c: x.reshape(c.hidden_size, c.num_heads, c.head_dim),
            lambda x, c: x.reshape(c.hidden_size, -1))


L = "{p}.layers.{i}."
_LLAMA_RULES = [
    Rule("{p}.embed_tokens.weight", "embed", _copy, _copy),
    Rule(L + "self_attn.q_proj.weight", "layers.{i}.attn.q", *_in_heads("num_heads")),
    Rule(L + "self_attn.k_proj.weight", "layers.{i}.attn.k", *_in_heads("num_kv_heads")),
    Rule(L + "self_attn.v_proj.weight", "layers.{i}.attn.v", *_in_heads("num_kv_heads")),
    Rule(L + "self_attn.o_proj.weight", "layers.{i}.attn.o", *_out_heads_linear()),
    Rule(L + "self_attn.q_proj.bias", "layers.{i}.attn.q_bias", *_bias_heads("num_heads")),
    Rule(L + "self_attn.k_proj.bias", "layers.{i}.attn.k_bias", *_bias_heads("num_kv_heads")),
    Rule(L + "self_attn.v_proj.bias", "layers.{i}.attn.v_bias", *_bias_heads("num_kv_heads")),
    Rule(L + "self_attn.o_proj.bias", "layers.{i}.attn.o_bias", _copy, _copy),
    Rule(L + "self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale", _copy, _copy),
    Rule(L + "self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale", _copy, _copy),
    Rule(L + "mlp.gate_proj.weight", "layers.{i}.mlp.gate", _t, _t),
    Rule(L + "mlp.up_proj.weight", "layers.{i}.mlp.up", _t, _t),
    Rule(L + "mlp.down_proj.weight", "layers.{i}.mlp.down", _t, _t),
    Rule(L + "mlp.gate_proj.bias", "layers.{i}.mlp.gate_bias", _copy, _copy),
    Rule(L + "mlp.up_proj.bias", "layers.{i}.mlp.up_bias", _copy, _copy),
    Rule(L + "mlp.down_proj.bias", "layers.{i}.mlp.down_bias", _copy, _copy),
    Rule(L + "input_layernorm.weight", "layers.{i}.attn_norm.scale", _copy, _copy),
    Rule("{p}.norm.weight", "final_norm.scale", _copy, _copy),
    Rule("lm_head.weight", "lm_head", _t, _t),
    Rule("score.weight", "head", _t, _t),
]
# Llama's `post_attention_layernorm` is the pre-MLP norm; Gemma 2/3 rename
# that one `pre_feedforward_layernorm` and add two norms after the sublayers.
_PRE_MLP_NORM = [Rule(L + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale", _copy, _copy)]
_SANDWICH_NORMS = [
    Rule(L + "pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.scale", _copy, _copy),
    Rule(L + "post_attention_layernorm.weight", "layers.{i}.post_attn_norm.scale", _copy, _copy),
    Rule(L + "post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.scale", _copy, _copy),
]

H = "{p}.h.{i}."
_GPT2_RULES = [
    Rule("{p}.wte.weight", "embed", _copy, _copy),
    Rule("{p}.wpe.weight", "pos_embed", _copy, _copy),
    Rule(H + "ln_1.weight", "layers.{i}.attn_norm.scale", _copy, _copy),
    Rule(H + "ln_1.bias", "layers.{i}.attn_norm.bias", _copy, _copy),
    *[Rule(H + "attn.c_attn.weight", f"layers.{{i}}.attn.{n}", *_conv_heads(), part=(j, 3))
      for j, n in enumerate("qkv")],
    *[Rule(H + "attn.c_attn.bias", f"layers.{{i}}.attn.{n}_bias", *_bias_heads("num_heads"), part=(j, 3))
      for j, n in enumerate("qkv")],
    Rule(H + "attn.c_proj.weight", "layers.{i}.attn.o", *_out_heads_conv()),
    Rule(H + "attn.c_proj.bias", "layers.{i}.attn.o_bias", _copy, _copy),
    Rule(H + "ln_2.weight", "layers.{i}.mlp_norm.scale", _copy, _copy),
    Rule(H + "ln_2.bias", "layers.{i}.mlp_norm.bias", _copy, _copy),
    Rule(H + "mlp.c_fc.weight", "layers.{i}.mlp.up", _copy, _copy),
    Rule(H + "mlp.c_fc.bias", "layers.{i}.mlp.up_bias", _copy, _copy),
    Rule(H + "mlp.c_proj.weight", "layers.{i}.mlp.down", _copy, _copy),
    Rule(H + "mlp.c_proj.bias", "layers.{i}.mlp.down_bias", _copy, _copy),
    Rule("{p}.ln_f.weight", "final_norm.scale", _copy, _copy),
    Rule("{p}.ln_f.bias", "final_norm.bias", _copy, _copy),
    Rule("lm_head.weight", "lm_head", _t, _t),
    Rule("score.weight", "head", _t, _t),
]

# Tensors that checkpoints may carry and that hold no parameters.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")

_ARCH = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
         "gemma2": "Gemma2", "gemma3_text": "Gemma3Text", "gpt2": "GPT2"}


def family_rules(cfg: ModelConfig) -> list[Rule]:
    if cfg.family == "gpt2":
        return _GPT2_RULES
    return _LLAMA_RULES + (_SANDWICH_NORMS if cfg.sandwich_norms else _PRE_MLP_NORM)


def _prefix(cfg: ModelConfig) -> str:
    return "transformer" if cfg.family == "gpt2" else "model"


def _param_leaves(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Dot-separated parameter paths -> Variables (values may be abstract)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[".".join(str(p) for p in path)] = var
    return out


def _bindings(model: nnx.Module, cfg: ModelConfig, value_model: bool):
    """(rule, hf_name, our_path, layer) for every parameter of `model`; checks the table covers it.

    Per-layer rules (`{i}`) bind one slice `layer` of a stacked `[L, ...]`
    parameter (`layers.attn.q`); the others bind a whole parameter (layer None).
    """
    params = _param_leaves(model)
    prefix = _prefix(cfg)
    bound, covered = [], set()
    for rule in family_rules(cfg):
        if value_model and rule.ours == "lm_head":
            covered.add("backbone.lm_head")  # a wrapped LM keeps its head; classifiers have none
            continue
        ours = rule.ours.replace("{i}.", "")
        if value_model:
            ours = ours if ours == "head" else "backbone." + ours
        if ours not in params:
            continue
        layers = range(cfg.num_layers) if "{i}" in rule.ours else [None]
        bound.extend((rule, rule.hf.format(i=i, p=prefix), ours, i) for i in layers)
        covered.add(ours)
    missing = set(params) - covered
    if missing:  # a bug in the table, not in the checkpoint
        raise AssertionError(f"no conversion rule for parameters {sorted(missing)}")
    return bound, params


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
    """One safetensors file read tensor by tensor with plain reads, not a memory map.

    A memory map keeps every page it has touched resident (and counted in the
    process's RSS) until it is closed, so loading through one costs a second
    copy of the checkpoint at peak; reading each tensor into its own buffer
    costs one tensor. bf16 tensors are returned as `ml_dtypes.bfloat16`.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        self.start = 8 + size
        header.pop("__metadata__", None)
        self.entries = header

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] == "BF16":
            import ml_dtypes

            dtype = np.dtype(ml_dtypes.bfloat16)
        elif e["dtype"] in _ST_DTYPES:
            dtype = np.dtype(_ST_DTYPES[e["dtype"]])
        else:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        lo, hi = e["data_offsets"]
        if hi - lo != dtype.itemsize * int(np.prod(e["shape"], dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor {name}: {hi - lo} bytes do not fit {e['shape']} {dtype}")
        with open(self.path, "rb") as f:
            f.seek(self.start + lo)
            data = np.fromfile(f, dtype=dtype, count=(hi - lo) // dtype.itemsize)
        if data.size * dtype.itemsize != hi - lo:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated "
                                  f"({data.size * dtype.itemsize} of {hi - lo} bytes); the file is incomplete")
        return data.reshape(e["shape"])


class _TensorReader:
    """Reads tensors lazily from one or several (indexed) safetensors files."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._handles, self.names = {}, {}
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{path}: shard {f} named in the index is missing")
            h = _SafetensorsFile(path / f)
            self._handles[f] = h
            for k in h.keys():
                self.names[k] = f

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handles[self.names[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.names[name]].get(name)


def _expected_hf_shapes(bound, params, cfg) -> dict[str, tuple[int, ...]]:
    parts: dict[str, list] = {}
    for rule, hf, ours, layer in bound:
        value = params[ours].get_value()
        if layer is not None:
            value = jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
        shape = jax.eval_shape(lambda x: rule.to_hf(x, cfg), value).shape
        parts.setdefault(hf, []).append(shape)
    return {hf: s[0][:-1] + (sum(p[-1] for p in s),) for hf, s in parts.items()}


def _abstract_from_dir(path: Path, dtype, compute_dtype, tokenizer=None, remat: str = "none"):
    """(cfg, value_model, abstract model) for a checkpoint directory; no tensor is read."""
    path = resolve_local_path(path)  # before transformers is imported: a missing path fails at once
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(path))
    cfg = config_from_hf(hf_cfg)
    archs = hf_cfg.to_dict().get("architectures") or []
    value_model = any(a.endswith("ForSequenceClassification") for a in archs)
    if value_model and getattr(hf_cfg, "num_labels", 1) != 1:
        raise CheckpointError(f"{path}: sequence classifier with {hf_cfg.num_labels} labels; a reward model has 1")
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    compute_dtype = compute_dtype or dtype

    def build():
        lm = Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=compute_dtype, lm_head=not value_model,
                         remat=remat)
        return ValueModel(lm, init="zeros") if value_model else lm

    return cfg, value_model, nnx.eval_shape(build)


def abstract_hf(path: str | os.PathLike, *, dtype=jnp.float32, compute_dtype=None, remat: str = "none"):
    """The model `load_hf(path)` returns, with shapes and dtypes only: no tensor is read.

    Its parameters are `jax.ShapeDtypeStruct`s. It has the same graph
    definition and parameter layout as the loaded model, so programs built
    for it run on the loaded parameters: `Sampler(abstract_hf(path)[0])`
    followed by `sampler.precompile(...)` compiles (or loads from the
    compilation cache) before the weights take memory, and the compiler's
    peak does not stack on them (docs/sampling.md).

    Returns `(abstract_model, cfg)`.
    """
    cfg, _, abstract = _abstract_from_dir(Path(path), dtype, compute_dtype, remat=remat)
    return abstract, cfg


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, compute_dtype=None, mesh=None, tokenizer=None,
            remat: str = "none"):
    """Load a Hugging Face checkpoint directory as a jaxalign model.

    Args:
      path: local directory with `config.json` and `model.safetensors` (or
        sharded files with `model.safetensors.index.json`).
      dtype: parameter dtype (float32 or bfloat16).
      compute_dtype: activation dtype (default: `dtype`).
      mesh: place the parameters on this mesh with `jaxalign.sharding` rules.
      tokenizer: a tokenizer (or its directory) to check against the model:
        a tokenizer with more ids than the embedding has rows is refused.
      remat: what the backward pass keeps of each layer (`Transformer`'s
        `remat`: none, full, save_dots).

    Returns:
      `(model, cfg)`: a :class:`Transformer`, or a :class:`ValueModel` for a
      `*ForSequenceClassification` checkpoint with one label.
    """
    path = Path(path)
    cfg, value_model, abstract = _abstract_from_dir(path, dtype, compute_dtype, tokenizer, remat)
    bound, params = _bindings(abstract, cfg, value_model)
    reader = _TensorReader(path)
    expected = _expected_hf_shapes(bound, params, cfg)
    for hf, shape in expected.items():
        if hf not in reader.names:
            raise CheckpointError(f"{path}: tensor {hf} is missing from the checkpoint")
        if reader.shape(hf) != shape:
            raise CheckpointError(f"{path}: tensor {hf} has shape {reader.shape(hf)}, expected {shape}")
    unused = [n for n in reader.names if n not in expected and not _IGNORED.search(n)
              and not (n == "lm_head.weight" and cfg.tie_embeddings)]
    if unused:
        raise CheckpointError(f"{path}: tensors not used by this config: {sorted(unused)[:8]}")

    cache: dict[str, np.ndarray] = {}
    stacks: dict[str, np.ndarray] = {}  # stacked parameters being filled, layer by layer
    for rule, hf, ours, layer in bound:
        if hf not in cache:
            cache = {hf: reader.get(hf)}  # part rules read the same tensor in a row
        x = cache[hf]
        if rule.part is not None:
            j, n = rule.part
            size = x.shape[-1] // n
            x = x[..., j * size:(j + 1) * size]
        value = np.asarray(rule.to_ours(x, cfg)).astype(jnp.dtype(dtype))
        if layer is not None:
            stack = stacks.setdefault(ours, np.empty(params[ours].shape, value.dtype))
            stack[layer] = value
            if layer < cfg.num_layers - 1:
                continue
            value = stacks.pop(ours)
        # device_put, not jnp.asarray: the latter compiles a staging program per shape.
        params[ours].set_value(value if mesh is not None else jax.device_put(value))
    model = abstract  # every parameter now holds its loaded value
    if mesh is not None:
        from jaxalign import sharding

        model = sharding.shard_model(model, mesh)
    del cache, reader
    release_host_memory()  # the read buffers, freed but still resident in glibc's arenas
    return model, cfg


def check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    if isinstance(tokenizer, (str, os.PathLike)):
        local = resolve_local_path(tokenizer, what="tokenizer path")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(local))
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {n} tokens but the model's vocabulary has {cfg.vocab_size} rows: "
            "they do not belong together"
        )


def hf_config_dict(model: nnx.Module) -> dict:
    """The `config.json` contents for `model` (its Hugging Face config, architectures set)."""
    value_model = isinstance(model, ValueModel)
    cfg = model.cfg
    hf = dict(cfg.hf_config)
    if not hf:
        raise ValueError("model config has no Hugging Face config; build configs with config_from_hf")
    suffix = "ForSequenceClassification" if value_model else "ForCausalLM"
    if cfg.family == "gpt2" and not value_model:
        suffix = "LMHeadModel"
    hf["architectures"] = [_ARCH[cfg.family] + suffix]
    if value_model:
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    hf["tie_word_embeddings"] = cfg.tie_embeddings
    hf["dtype"] = str(jnp.dtype(_param_leaves(model)["head" if value_model else "embed"][...].dtype))
    return hf


def _host_array(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_hf(model: nnx.Module, path: str | os.PathLike, *, tokenizer=None,
            max_shard_bytes: int | None = None, extra_config: dict | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads.

    `model.safetensors` (or shards of at most `max_shard_bytes` with an index)
    plus `config.json`; the tokenizer too when given. `extra_config` entries
    are merged into `config.json` (e.g. reward normalisation statistics).
    With several processes, call it on all of them: parameters sharded across
    hosts are gathered, and process 0 writes.
    """
    from safetensors.numpy import save_file

    value_model = isinstance(model, ValueModel)
    cfg = model.cfg
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bound, params = _bindings(model, cfg, value_model)
    tensors: dict[str, list] = {}
    host: dict[str, np.ndarray] = {}  # one parameter (a whole stack) on the host at a time
    for rule, hf, ours, layer in bound:
        if ours not in host:
            host = {ours: _host_array(params[ours][...])}
        arr = host[ours] if layer is None else host[ours][layer]
        tensors.setdefault(hf, []).append((rule.part, np.asarray(rule.to_hf(arr, cfg))))
    if jax.process_index() != 0:
        return path
    out = {}
    for hf, pieces in tensors.items():
        pieces.sort(key=lambda p: (p[0] or (0, 1))[0])
        arr = np.concatenate([p for _, p in pieces], axis=-1) if len(pieces) > 1 else pieces[0][1]
        out[hf] = np.ascontiguousarray(arr)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(out, str(path / "model.safetensors"), metadata=meta)
    else:
        shards, current, size = [], {}, 0
        for name, arr in out.items():
            if current and size + arr.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = arr
            size += arr.nbytes
        shards.append(current)
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in out.values()))}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = hf_config_dict(model)
    hf.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(hf, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
