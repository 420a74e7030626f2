"""Train an on-policy algorithm (GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++, PPO) from a config file.

    python experiments/rl.py --config experiments/configs/grpo_gsm8k.py \
        --config.model.path=/ckpt/Qwen2.5-0.5B-Instruct --config.workdir=runs/grpo_gsm8k
    python experiments/rl.py --config experiments/configs/grpo_arithmetic.py \
        --config.algorithm.name=gspo --config.algorithm.clip_eps_high=5e-4

Every algorithm is a preset of one driver (`jaxalign.algorithms.onpolicy`);
`config.algorithm.name` picks the preset and any other `config.algorithm.*`
field overrides it. Prompts come from the built-in arithmetic or instruct
task, TFDS's `gsm8k`, or a local `{"prompt", "answer"}` JSONL file; rewards
from a verifier and/or a reward model. The resolved config is written to
`<workdir>/config.json`. Every worker of a TPU pod runs the same command
(docs/training.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import wiring  # noqa: E402
from experiments.cli import launch  # noqa: E402


def run(config) -> dict:
    import jax

    from jaxalign import sharding

    from jaxalign import data, models, training
    from jaxalign.models import peft  # noqa: F401  (models.peft.export_model)
    from jaxalign.algorithms import evaluation
    from jaxalign.sampling import Sampler

    cfg = wiring.resolve_rl(config)
    task, workdir = cfg["task"], cfg["workdir"]
    sharding.maybe_initialize_distributed()
    wiring.write_config(workdir, cfg)
    mesh = sharding.make_mesh(cfg["mesh"])
    model, tokenizer = wiring.build_model(cfg["model"], mesh)
    reward_fn = wiring.build_reward(cfg["reward"])
    tok_kw = dict(max_length=task.max_prompt_length, overlong="truncate")
    train_prompts = data.tokenize_prompts(wiring.prompt_records(task, "train"), tokenizer, **tok_kw)
    loader = data.Loader(train_prompts, batch_size=cfg["algorithm"].prompts_per_step, seed=cfg["seed"],
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         buckets=task.prompt_buckets or None)
    test_records = wiring.prompt_records(task, "test")
    test_prompts = data.tokenize_prompts(test_records, tokenizer, **tok_kw) if test_records is not None else None
    optimizer = training.make_optimizer(cfg["optim"])
    built = wiring.build_onpolicy(cfg["algorithm"], cfg["sampling"], model, tokenizer=tokenizer,
                                  reward_fn=reward_fn, prompts=loader, optimizer=optimizer, mesh=mesh,
                                  seed=cfg["seed"], train=cfg["train"])
    sampler = Sampler(model)

    def evaluate(state, step_num):
        if test_prompts is None:
            return {}
        score = evaluation.greedy_score(sampler, built.policy_params(state.params), test_prompts, reward_fn,
                                        tokenizer, max_new_tokens=cfg["sampling"].max_new_tokens,
                                        batch_size=task.eval_batch_size)
        return {"greedy_reward": score}

    checkpointer = wiring.build_checkpointer(workdir, cfg["checkpoint"])
    state, rows = training.train(built.step, built.state, loader, workdir=workdir, checkpointer=checkpointer,
                                 eval_fn=evaluate, **wiring.train_kwargs(cfg["train"]))
    checkpointer.close()
    # A LoRA policy: `export/` merged, `export_adapter/` its PEFT adapter.
    models.peft.export_model(built.policy_module(state.params), workdir, tokenizer=tokenizer)
    return {"rows": rows, "state": state}


if __name__ == "__main__":
    launch(run)
