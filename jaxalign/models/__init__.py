"""Flax NNX decoder-only transformers for Hugging Face families, with import/export.

    model, cfg = load_hf("path/to/hf_dir")        # Llama, Mistral, Qwen2/3, Gemma 1/2/3, GPT-2
    shapes, cfg = abstract_hf("path/to/hf_dir")   # the same model, shapes only (compile before loading)
    logits = model(tokens)                         # [B, T, V]
    save_hf(model, "out_dir")                      # transformers loads it back
"""

from jaxalign.models.clone import clone_model, copy_tree
from jaxalign.models.config import (
    SUPPORTED_FAMILIES,
    ModelConfig,
    RopeConfig,
    UnsupportedConfigError,
    config_from_hf,
)
from jaxalign.models.convert import (
    CheckpointError,
    abstract_hf,
    check_tokenizer,
    hf_config_dict,
    load_hf,
    resolve_local_path,
    save_hf,
)
from jaxalign.models.gguf import gguf_to_hf, load_gguf
from jaxalign.models.heads import ValueModel, last_token_scores, with_value_head
from jaxalign.models.transformer import KVCache, Transformer
from jaxalign.models.tiny import tiny_config

__all__ = [
    "SUPPORTED_FAMILIES", "CheckpointError", "KVCache", "ModelConfig", "RopeConfig", "Transformer",
    "UnsupportedConfigError", "ValueModel", "abstract_hf", "check_tokenizer", "clone_model", "config_from_hf",
    "copy_tree", "gguf_to_hf", "hf_config_dict", "last_token_scores", "load_gguf", "load_hf", "resolve_local_path",
    "save_hf", "tiny_config", "with_value_head",
]
