"""Shared defaults of the on-policy configs (experiments/rl.py), nested by concern."""

from ml_collections import ConfigDict

from experiments import wiring
from experiments.configs.base import base_config


def rl_base_config(algorithm: str) -> ConfigDict:
    """`algorithm` is a preset of `jaxalign.algorithms.onpolicy`; the fields of
    `config.algorithm` left unset take the preset's values."""
    from jaxalign.algorithms.onpolicy import OnPolicyConfig
    from jaxalign.algorithms.rollout import SamplingConfig

    c = base_config()
    del c.data
    c.workdir = f"runs/{algorithm}"
    c.task = wiring.section(wiring.TaskSection)
    c.reward = wiring.section(wiring.RewardSection)
    c.algorithm = wiring.preset_section(OnPolicyConfig, algorithm, prompts_per_step=32)
    c.sampling = wiring.section(SamplingConfig, max_new_tokens=6, temperature=1.0)
    c.optim.update(dict(lr=2e-4, schedule="constant", warmup_steps=0))
    c.train.update(dict(steps=60, log_every=10, eval_every=20))
    c.checkpoint.every = 20
    return c


def arithmetic_config(algorithm: str) -> ConfigDict:
    """The built-in task from the SFT checkpoint `make demo` writes (runs/demo/sft)."""
    c = rl_base_config(algorithm)
    c.model.path = "runs/demo/sft"
    return c


def gsm8k_config(algorithm: str) -> ConfigDict:
    """GSM8K through TFDS with an instruct model, for a TPU/GPU pod.

    Build the TFDS data once where there is network (`tfds.data_source("gsm8k",
    download=True, builder_kwargs={"file_format": "array_record"})`) into
    `task.data_dir`, then on every worker of the pod:

        python experiments/rl.py --config experiments/configs/grpo_gsm8k.py \
            --config.model.path=/ckpt/Qwen2.5-0.5B-Instruct --config.task.data_dir=gs://bucket/tfds \
            --config.mesh.fsdp=-1 --config.mesh.data=1
    """
    c = rl_base_config(algorithm)
    c.model.path = ""  # a local Hugging Face directory, e.g. Qwen2.5-0.5B-Instruct or Llama-3.2-1B-Instruct
    c.model.dtype = "bfloat16"
    c.task.update(dict(kind="gsm8k", max_prompt_length=512, prompt_buckets=64, eval_batch_size=256))
    c.reward.verifier = "numeric_match"
    c.algorithm.update(dict(prompts_per_step=64, group_size=8))
    c.sampling.update(dict(max_new_tokens=512, temperature=1.0))
    c.optim.update(dict(lr=1e-6, grad_clip_norm=1.0))
    c.train.update(dict(steps=500, eval_every=50))
    c.checkpoint.every = 50
    return c
