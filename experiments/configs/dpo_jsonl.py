"""DPO (any `loss_type`, or reference-free `simpo`/`orpo`) on a local preference JSONL file.

    python experiments/train.py --config experiments/configs/dpo_jsonl.py \
        --config.data.train=pairs.jsonl --config.model.path=/ckpt/sft --config.algorithm.loss_type=ipo
"""

from ml_collections import ConfigDict

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/dpo"
    c.algorithm = ConfigDict(dict(name="dpo", beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                                  rpo_alpha=0.0, precompute_reference=True))
    c.optim.lr = 5e-7
    return c
