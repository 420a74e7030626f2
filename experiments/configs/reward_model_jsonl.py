"""Bradley–Terry reward model on a local `{"prompt", "chosen", "rejected"}` JSONL file.

The scalar head starts at N(0, 1/(D+1)); the exported checkpoint is a
`*ForSequenceClassification` with one label, plus the reward mean/std.
"""

from experiments import wiring
from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/reward_model"
    c.algorithm = wiring.offline_section("reward_model")
    c.optim.lr = 1e-5
    return c
