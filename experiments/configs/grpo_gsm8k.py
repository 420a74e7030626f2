"""GRPO on GSM8K (TFDS) with an instruct model; see rl_base.gsm8k_config for the pod launch.

    python experiments/rl.py --config experiments/configs/grpo_gsm8k.py \
        --config.model.path=/ckpt/Qwen2.5-0.5B-Instruct --config.task.data_dir=/data/tfds
"""

from experiments.configs.rl_base import gsm8k_config


def get_config():
    return gsm8k_config("grpo")
