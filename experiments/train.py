"""Train an offline algorithm (SFT, reward model, DPO) from a config file.

    python experiments/train.py --config experiments/configs/sft_jsonl.py \
        --config.data.train=train.jsonl --config.model.path=/ckpt/hf --config.workdir=runs/sft

Every worker of a TPU pod runs the same command (see docs/training.md).
The config's sections are unpacked into typed configs by `experiments/wiring.py`
(every field settable as `--config.<section>.<field>`; the resolved config is
written to `<workdir>/config.json`).
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import wiring  # noqa: E402
from experiments.cli import launch  # noqa: E402


def one_pass(loader):
    """A loader over the same data and shard: one epoch in source order."""
    from jaxalign import data

    return data.Loader(loader.data, batch_size=loader.batch_size, shuffle=False, num_epochs=1,
                       shard_index=loader.shard_index, shard_count=loader.shard_count, buckets=loader.buckets)


def build_loss(name: str, cfg, model, train_loader, *, precompute_reference: bool = True,
               logprob_chunk: int | None = None):
    """(loss_fn, batch transform) for `config.algorithm.name`; `cfg` is the DPO config,
    `logprob_chunk` is `config.train.logprob_chunk`."""
    from jaxalign import models
    from jaxalign.algorithms import dpo, reward_model, sft
    from jaxalign.models import lora, peft  # noqa: F401  (models.lora, models.peft)

    if name == "sft":
        return functools.partial(sft.sft_loss_fn, logprob_chunk=logprob_chunk), None
    if name == "reward_model":
        return reward_model.reward_loss_fn, None
    if name == "dpo":
        if not cfg.needs_reference:
            return dpo.make_dpo_loss_fn(cfg, logprob_chunk=logprob_chunk), None

        if models.lora.has_lora(model) and not precompute_reference:  # the base, adapters off, in the step
            return dpo.with_base_reference(dpo.make_dpo_loss_fn(cfg, logprob_chunk=logprob_chunk),
                                           logprob_chunk=logprob_chunk), None
        # A LoRA policy's reference is its own base (adapters off, no copy), tabled before training.
        reference = models.lora.base_view(model) if models.lora.has_lora(model) else models.clone_model(model)
        ref_fn = dpo.make_reference_fn(reference, logprob_chunk=logprob_chunk)
        loss_fn = dpo.make_dpo_loss_fn(cfg, logprob_chunk=logprob_chunk)
        if precompute_reference:
            table = dpo.precompute_reference(ref_fn, train_loader.data, batch_size=train_loader.batch_size)
            return loss_fn, lambda b: dpo.attach_reference(b, table=table)
        return loss_fn, lambda b: dpo.attach_reference(b, ref_fn=ref_fn)
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

    from jaxalign import models, sharding, training
    from jaxalign.algorithms.common import PairStep, pair_options
    from jaxalign.models import peft  # noqa: F401  (models.peft.export_model)

    cfg = wiring.resolve_train(config)
    workdir, algo = cfg["workdir"], cfg["name"]
    sharding.maybe_initialize_distributed()
    wiring.write_config(workdir, cfg)
    mesh = sharding.make_mesh(cfg["mesh"])
    kind = "sft" if algo == "sft" else "preference"
    model, tokenizer = wiring.build_model(cfg["model"], mesh, value_head=algo == "reward_model")
    train_loader, test_loader = wiring.build_data(cfg["data"], kind, tokenizer, seed=cfg["seed"])
    loss_fn, transform = build_loss(algo, cfg["algorithm"], model, train_loader,
                                    precompute_reference=cfg["precompute_reference"],
                                    logprob_chunk=cfg["train"].logprob_chunk)
    optimizer = training.make_optimizer(cfg["optim"])
    state, model_def = training.init_train_state(model, optimizer, mesh=mesh, seed=cfg["seed"])
    train_step = wiring.build_train_step(loss_fn, optimizer, state, model_def, cfg["train"])
    # Preference batches carry the batcher's score_width; DPO scores only those columns (`last=`).
    scores_last = algo == "dpo"
    step = train_step if kind == "sft" else PairStep(train_step, last=scores_last)
    batches = _Mapped(train_loader, transform) if transform else train_loader

    def split(batch):
        """(arrays placed on the mesh, the loss's static options)."""
        arrays, options = (batch, {}) if kind == "sft" else pair_options(batch, last=scores_last)
        return train_step.place_batch(arrays), options

    evaluator = jax.jit(lambda p, b, options: loss_fn(model_def.merge(p), b, jax.random.key(0), **dict(options)),
                        static_argnums=2)

    def evaluate(state, step_num):
        if test_loader is None:
            return {}
        test_loader.epoch = test_loader.step = 0
        nums = dens = 0.0
        for batch in test_loader:
            arrays, options = split(transform(batch) if transform else batch)
            (num, den), _ = evaluator(state.params, arrays, tuple(sorted(options.items())))
            nums, dens = nums + float(num), dens + float(den)
        return {"loss": nums / max(dens, 1.0)}

    checkpointer = wiring.build_checkpointer(workdir, cfg["checkpoint"])
    state, rows = training.train(step, state, batches, workdir=workdir, checkpointer=checkpointer,
                                 eval_fn=evaluate, **wiring.train_kwargs(cfg["train"]))
    checkpointer.close()
    trained = model_def.merge(state.params)
    extra = None
    if algo == "reward_model":
        from jaxalign.algorithms import reward_model

        scorer = jax.jit(lambda p, b: reward_model.pair_scores(model_def.merge(p), b))
        stats = reward_model.reward_statistics(lambda b: scorer(state.params, split(b)[0]),
                                               one_pass(train_loader))
        extra = {reward_model.NORM_KEY: stats}
    models.peft.export_model(trained, workdir, tokenizer=tokenizer, extra_config=extra)
    return {"rows": rows, "state": state}


if __name__ == "__main__":
    launch(run)
