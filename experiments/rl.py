"""Train an on-policy algorithm (GRPO, Dr. GRPO, DAPO, PPO) from a config file.

    python experiments/rl.py --config experiments/configs/grpo_gsm8k.py \
        --config.model.path=/ckpt/Qwen2.5-0.5B-Instruct --config.workdir=runs/grpo_gsm8k

Prompts come from the built-in arithmetic or instruct task, TFDS's `gsm8k`, or a local
`{"prompt", "answer"}` JSONL file; rewards from a verifier and/or a reward
model. Every worker of a TPU pod runs the same command (docs/training.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import launch  # noqa: E402

from experiments.train import build_model  # noqa: E402
from jaxalign import sharding  # noqa: E402



def prompt_records(task_cfg, split: str):
    """`{"prompt", "answer"}` records of `split` for `config.task.kind`."""
    import numpy as np

    from jaxalign import data
    from jaxalign.tasks import arithmetic, instruct

    if task_cfg.kind == "instruct":
        return instruct.held_out(task_cfg.eval_prompts) if split == "test" else \
            instruct.train_records(task_cfg.train_prompts, seed=task_cfg.seed)
    if task_cfg.kind == "arithmetic":
        problems = (arithmetic.held_out(task_cfg.eval_prompts) if split == "test" else
                    arithmetic.sample_problems(np.random.default_rng(task_cfg.seed), task_cfg.train_prompts))
        return [{"prompt": p, "answer": a} for p, a in zip(problems.prompts, problems.answers)]
    if task_cfg.kind == "gsm8k":
        return data.gsm8k_prompts(split, data_dir=task_cfg.data_dir or None)
    if task_cfg.kind == "jsonl":
        files = {"train": task_cfg.train, "test": task_cfg.test}[split]
        if not files:
            return None
        return data.prepare("prompt_answer", files, data_dir=task_cfg.data_dir)["train"]
    raise ValueError(f"task.kind {task_cfg.kind!r}: arithmetic, instruct, gsm8k or jsonl")


def build_reward(reward_cfg):
    from jaxalign import rewards

    from jaxalign.tasks import instruct

    fns = []
    if reward_cfg.verifier == "instruct":  # reads the rollout (truncation), not just the text
        fns.append((instruct.follows_constraints, reward_cfg.verifier_weight))
    elif reward_cfg.verifier:
        fns.append((rewards.from_verifier(rewards.VERIFIERS[reward_cfg.verifier]), reward_cfg.verifier_weight))
    if reward_cfg.reward_model:
        fns.append((rewards.RewardModelScorer.from_pretrained(reward_cfg.reward_model), reward_cfg.reward_model_weight))
    return rewards.combine(fns)


def build_step(algo_cfg, model, tokenizer, reward_fn, loader, optimizer, mesh, seed: int):
    """(step function for the loop, initial state, params -> policy params, params -> policy module)."""

    from flax import nnx

    from jaxalign import models, training
    from jaxalign.algorithms import group, ppo
    from jaxalign.algorithms.rollout import SamplingConfig
    from jaxalign.sampling import Sampler

    sampling = SamplingConfig(max_new_tokens=algo_cfg.max_new_tokens, temperature=algo_cfg.temperature)
    reference = models.clone_model(model)
    if algo_cfg.name == "ppo":
        cfg = ppo.PPOConfig(prompts_per_step=loader.batch_size, sampling=sampling, kl_coef=algo_cfg.kl_coef,
                            epochs=algo_cfg.epochs, critic=algo_cfg.critic)
        trained = ppo.ActorCritic(model, shared=cfg.critic == "shared")
        loss_fn = ppo.make_ppo_loss_fn(cfg)
    else:
        cfg = group.preset(algo_cfg.name, group_size=algo_cfg.group_size, prompts_per_step=loader.batch_size,
                           sampling=sampling, mu=algo_cfg.mu)
        trained = model
        loss_fn = group.make_group_loss_fn(cfg)
    state, model_def = training.init_train_state(trained, optimizer, mesh=mesh, seed=seed)
    step = training.make_train_step(loss_fn, optimizer, model_def=model_def,
                                    shardings=training.state_shardings(state))
    if algo_cfg.name == "ppo":
        fn = ppo.PPOStep(cfg, train_step=step, model=trained, reference=reference, reward_fn=reward_fn,
                         tokenizer=tokenizer, sampler=Sampler(trained.actor), seed=seed)
        return fn, state, (lambda p: p["actor"]), lambda p: model_def.merge(p).actor
    # GroupStep copies these (the train state may alias and donate the arrays they came from).
    ref_params = nnx.to_pure_dict(nnx.state(reference, nnx.Param)) if cfg.beta > 0 else None
    fn = group.GroupStep(cfg, train_step=step, sampler=Sampler(model), reward_fn=reward_fn, tokenizer=tokenizer,
                         prompts=loader, reference_params=ref_params,
                         reference_model=reference if ref_params is not None else None, seed=seed)
    return fn, state, (lambda p: p), model_def.merge


def run(config) -> dict:
    import jax

    from jaxalign import data, models, training
    from jaxalign.algorithms import evaluation
    from jaxalign.sampling import Sampler

    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh))
    model, tokenizer = build_model(config.model, mesh)
    reward_fn = build_reward(config.reward)
    tok_kw = dict(max_length=config.task.max_prompt_length, overlong="truncate")
    train_prompts = data.tokenize_prompts(prompt_records(config.task, "train"), tokenizer, **tok_kw)
    loader = data.Loader(train_prompts, batch_size=config.algorithm.prompts_per_step, seed=config.seed,
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         buckets=config.task.prompt_buckets or None)
    test_records = prompt_records(config.task, "test")
    test_prompts = data.tokenize_prompts(test_records, tokenizer, **tok_kw) if test_records is not None else None
    optimizer = training.make_optimizer(training.OptimConfig(**config.optim))
    step_fn, state, policy_params, policy_module = build_step(config.algorithm, model, tokenizer, reward_fn, loader,
                                                   optimizer, mesh, config.seed)
    sampler = Sampler(model)

    def evaluate(state, step_num):
        if test_prompts is None:
            return {}
        score = evaluation.greedy_score(sampler, policy_params(state.params), test_prompts, reward_fn, tokenizer,
                                        max_new_tokens=config.algorithm.max_new_tokens,
                                        batch_size=config.task.eval_batch_size)
        return {"greedy_reward": score}

    checkpointer = training.Checkpointer(os.path.join(config.workdir, "checkpoints"),
                                         save_every=config.checkpoint.every, keep=config.checkpoint.keep)
    state, rows = training.train(step_fn, state, loader, num_steps=config.train.steps, workdir=config.workdir,
                                 checkpointer=checkpointer, eval_fn=evaluate, eval_every=config.train.eval_every,
                                 log_every=config.train.log_every)
    checkpointer.close()
    policy = policy_module(state.params)
    models.save_hf(policy, os.path.join(config.workdir, "export"), tokenizer=tokenizer)
    return {"rows": rows, "state": state}


if __name__ == "__main__":
    launch(run)
