"""SFT on a local `{"prompt", "completion"}` JSONL file.

    python experiments/train.py --config experiments/configs/sft_jsonl.py \
        --config.data.train=train.jsonl --config.model.path=/ckpt/Qwen2.5-0.5B-Instruct
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/sft"
    c.algorithm.name = "sft"
    c.optim.lr = 1e-5
    return c
