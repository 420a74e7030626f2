"""Tiny random Hugging Face models built locally with transformers + torch (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, overrides). Covers GQA ratios (1, 2, 4), tied and
# untied embeddings, Llama-3 and linear RoPE scaling, biases, q/k norms,
# Gemma 2 soft-capping and sliding windows (window 3 < sequence length).
VARIANTS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-mha-tied-bias": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                attention_bias=True, mlp_bias=True)),
    "llama3-rope-mqa": ("LlamaConfig", dict(num_key_value_heads=1, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    "llama-linear-rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                   factor=2.0))),
    "mistral-window": ("MistralConfig", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    sliding_window=3, query_pre_attn_scalar=12)),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"],
                                             rope_parameters=dict(
                                                 sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                                 full_attention=dict(rope_type="linear", rope_theta=1e6,
                                                                     factor=4.0)))),
    "gpt2": ("GPT2Config", dict()),
}


def hf_config(name: str, **extra):
    cls, over = VARIANTS[name]
    if cls == "GPT2Config":
        kw = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kw = dict(_BASE)
    kw.update(over)
    kw.update(extra)
    return getattr(transformers, cls)(**kw)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Give every parameter (norms and biases too) random values so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std + (0.0 if p.ndim > 1 else 0.1))


def build_hf_lm(name: str, path, seed: int = 0, **extra):
    """A random tiny causal LM of variant `name` saved to `path`; returns the torch model."""
    cfg = hf_config(name, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed)
    model.save_pretrained(str(path))
    return model


def build_hf_classifier(name: str, path, seed: int = 0):
    cfg = hf_config(name, num_labels=1)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed)
    model.save_pretrained(str(path))
    return model


def padded_batch(vocab: int, seed: int = 0, t: int = 10):
    """Tokens `[3, t]` and mask: one full row, one right-padded, one left-padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(3, t)).astype(np.int32)
    mask = np.ones((3, t), np.int32)
    mask[1, -3:] = 0
    mask[2, :4] = 0
    tokens[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def torch_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()
