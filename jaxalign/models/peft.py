"""LoRA adapters to and from PEFT's format, and the merged Hugging Face export.

    save_peft_adapter(model, "run/export_adapter")   # adapter_config.json + adapter_model.safetensors
    load_peft_adapter(model, "run/export_adapter")   # into a model with the same rank and targets
    save_merged(model, "run/export")                 # W + s·A B: a plain transformers checkpoint

PEFT names one adapter pair per layer and projection,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and
`...lora_B.weight` `[out, r]`, with `in`/`out` the flattened Hugging Face
features. Ours are stacked: `A: [L, in..., r]`, `B: [L, r, out...]` (heads kept
apart), so the conversion is a transpose and a reshape per layer. The
flattening order of the head axes is the one `convert.py` uses for the
weights, `(head, head_dim)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.convert import _host_array, save_hf
from jaxalign.models.lora import TARGETS, lora_config_of, merged

# Our target name -> the Hugging Face module it adapts (Llama-style families).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PREFIX = "base_model.model.model.layers.{i}."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _check_family(model) -> None:
    if model.cfg.family == "gpt2":
        raise ValueError("PEFT adapters: GPT-2's fused c_attn projection has no q/k/v modules to name; "
                         "export the merged checkpoint (save_merged) instead")


def _pairs(model):
    """(target, A Variable, B Variable) of every adapted projection."""
    _, _, targets = lora_config_of(model)
    for t in targets:
        module = getattr(model.layers, TARGETS[t][0])
        yield t, getattr(module, f"{t}_lora_a"), getattr(module, f"{t}_lora_b")


def save_peft_adapter(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Writes the adapters of `model` as a PEFT LoRA adapter that `PeftModel.from_pretrained` loads."""
    from safetensors.numpy import save_file

    _check_family(model)
    rank, scaling, targets = lora_config_of(model)
    path = Path(path)
    tensors = {}
    for t, a, b in _pairs(model):
        a_host, b_host = _host_array(a[...]), _host_array(b[...])
        for i in range(a_host.shape[0]):
            name = PREFIX.format(i=i) + HF_MODULES[t]
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a_host[i].reshape(-1, rank).T)
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b_host[i].reshape(rank, -1).T)
    if jax.process_index() != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scaling * rank,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in targets), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": None, "modules_to_save": None,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_peft_adapter(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Reads a PEFT LoRA adapter into the adapters of `model` (in place), to continue training.

    The model must carry adapters of the same rank, scale and targets
    (`attach_lora` with the adapter's `r`, `lora_alpha`, `target_modules`).
    """
    from safetensors.numpy import load_file

    _check_family(model)
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: a PEFT adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((path / CONFIG_FILE).read_text())
    rank, scaling, targets = lora_config_of(model)
    theirs = sorted(config.get("target_modules") or [])
    ours = sorted(HF_MODULES[t].split(".")[-1] for t in targets)
    if config.get("r") != rank or not np.isclose(config.get("lora_alpha", 0) / rank, scaling) or theirs != ours:
        raise ValueError(f"{path / CONFIG_FILE}: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
                         f"target_modules={theirs} do not match the model's rank={rank}, "
                         f"alpha={scaling * rank}, targets={ours}")
    if config.get("use_rslora") or config.get("fan_in_fan_out"):
        raise ValueError(f"{path / CONFIG_FILE}: use_rslora / fan_in_fan_out adapters are not supported")
    tensors = load_file(str(path / WEIGHTS_FILE))
    for t, a, b in _pairs(model):
        layers = a.shape[0]
        names = [PREFIX.format(i=i) + HF_MODULES[t] for i in range(layers)]
        for n in names:
            for part in (".lora_A.weight", ".lora_B.weight"):
                if n + part not in tensors:
                    raise KeyError(f"{path / WEIGHTS_FILE}: tensor {n + part} is missing")
        new_a = np.stack([tensors[n + ".lora_A.weight"].T.reshape(a.shape[1:]) for n in names])
        new_b = np.stack([tensors[n + ".lora_B.weight"].T.reshape(b.shape[1:]) for n in names])
        for var, new in ((a, new_a), (b, new_b)):
            old = var[...]
            var[...] = jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
    return model


def save_merged(model: nnx.Module, path: str | os.PathLike, *, tokenizer=None) -> Path:
    """A Hugging Face checkpoint of the adapted model with W + s·A B folded in (QLoRA codes dequantized)."""
    return save_hf(merged(model), path, tokenizer=tokenizer)


def export_model(model: nnx.Module, workdir: str | os.PathLike, *, tokenizer=None, extra_config=None) -> None:
    """A run's exports: `<workdir>/export/`, a Hugging Face checkpoint (merged when `model` has
    adapters), and for a LoRA model `<workdir>/export_adapter/`, its PEFT adapter."""
    from jaxalign.models.lora import has_lora

    workdir = Path(workdir)
    if not has_lora(model):
        save_hf(model, workdir / "export", tokenizer=tokenizer, extra_config=extra_config)
        return
    save_hf(merged(model), workdir / "export", tokenizer=tokenizer, extra_config=extra_config)
    # GPT-2's fused projections have no PEFT names (`_check_family`); a reward model is not a causal LM.
    if model.cfg.family != "gpt2" and hasattr(model, "layers"):
        save_peft_adapter(model, workdir / "export_adapter")


__all__ = ["HF_MODULES", "export_model", "load_peft_adapter", "save_merged", "save_peft_adapter"]
