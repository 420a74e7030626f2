"""DPO (any `loss_type`, or reference-free `simpo`/`orpo`) on a local preference JSONL file.

    python experiments/train.py --config experiments/configs/dpo_jsonl.py \
        --config.data.train=pairs.jsonl --config.model.path=/ckpt/sft --config.algorithm.loss_type=ipo
"""

from experiments import wiring
from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/dpo"
    c.algorithm = wiring.offline_section("dpo", beta=0.1, loss_type="sigmoid")
    c.optim.lr = 5e-7
    return c
