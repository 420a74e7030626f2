"""Shared defaults of the on-policy configs (experiments/rl.py), nested by concern."""

from ml_collections import ConfigDict

from experiments.configs.base import base_config


def rl_base_config(algorithm: str) -> ConfigDict:
    c = base_config()
    del c.data
    c.workdir = f"runs/{algorithm}"
    # kind: arithmetic (built-in), gsm8k (TFDS), jsonl ({"prompt", "answer"} files).
    c.task = ConfigDict(dict(kind="arithmetic", seed=0, train_prompts=20000, eval_prompts=1000, data_dir="",
                             train="", test="", max_prompt_length=8, prompt_buckets=8, eval_batch_size=1000))
    c.reward = ConfigDict(dict(verifier="exact_match", verifier_weight=1.0, reward_model="",
                               reward_model_weight=1.0))
    c.algorithm = ConfigDict(dict(name=algorithm, prompts_per_step=32, group_size=8, mu=1, max_new_tokens=6,
                                  temperature=1.0, kl_coef=0.02, epochs=2, critic="separate"))
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
    c.algorithm.update(dict(prompts_per_step=64, group_size=8, max_new_tokens=512, temperature=1.0))
    c.optim.update(dict(lr=1e-6, grad_clip_norm=1.0))
    c.train.update(dict(steps=500, eval_every=50))
    c.checkpoint.every = 50
    return c
