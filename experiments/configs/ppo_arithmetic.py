"""PPO on the built-in arithmetic task, from the SFT checkpoint `make demo` writes.

    python experiments/rl.py --config experiments/configs/ppo_arithmetic.py
"""

from experiments.configs.rl_base import arithmetic_config


def get_config():
    c = arithmetic_config("ppo")
    c.algorithm.beta = 0.02  # the KL penalty in the reward; the preset's 0.05 holds this tiny model too close
    return c
