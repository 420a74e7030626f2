"""Tiny configs of every family, built with transformers' own config classes (no torch)."""

from __future__ import annotations

from jaxalign.models.config import ModelConfig, config_from_hf

_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
            "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "gpt2": "GPT2Config"}


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A small random-init-sized config of `family` (hidden 64, 2 layers, vocab 128 by default).

    Keyword overrides are Hugging Face config fields (e.g. `num_key_value_heads=1`,
    `vocab_size=16`), so the result round-trips through `save_hf`.
    """
    import transformers

    if family == "gpt2":
        kw = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    else:
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    kw.update(overrides)
    hf = getattr(transformers, _CLASSES[family])(**kw)
    return config_from_hf(hf)
