"""GRPO on the built-in arithmetic task, from the SFT checkpoint `make demo` writes.

    python experiments/rl.py --config experiments/configs/grpo_arithmetic.py
"""

from experiments.configs.rl_base import arithmetic_config


def get_config():
    return arithmetic_config("grpo")
