"""The programs of a run, built from shapes and compiled for a topology: `experiments/plan.py`'s engine.

`Planner` turns an experiment config (resolved by `experiments/wiring.py`) and
a `config.json` into the run's programs (train step, reference, sampler
prefill and decode, log-probs, critic, reward model), lowers each on sharded
`jax.ShapeDtypeStruct`s and compiles it, keeping XLA's memory analysis and the
model FLOPs per chip (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
import typing

from experiments import wiring

GIB = 2**30

@dataclasses.dataclass
class Program:
    """One compiled program of the run, per chip. resident: the resident bytes among its arguments;
    runs: how many times one training step runs it (for the step-time estimate)."""

    name: str  # flops: per chip, per run; estimated_s: the roofline bound max(FLOPs / peak, bytes / bandwidth)
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    flops: float
    estimated_s: float
    compile_s: float
    runs: int = 1
    resident: int = 0
    error: str = ""
    xla_flops: float = 0.0
    xla_optimal_s: float = 0.0



class Chip(typing.NamedTuple):
    """One device of the topology: HBM bytes, peak bf16 FLOP/s, HBM bytes/s."""

    hbm: int
    flops: float
    bandwidth: float


def forward_flops(cfg, rows: int, tokens: int, *, context: int, scored: int) -> float:
    """Matmul FLOPs of a forward pass: `rows` x `tokens` new tokens attending to `context` positions,
    the LM head on `scored` of them. XLA's own count is unusable for scanned layers: its cost model
    counts a loop body once, and its time estimate then comes out negative."""
    d, dh = cfg.hidden_size, cfg.head_dim
    attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = d * cfg.intermediate_size * (3 if cfg.mlp == "gated" else 2)
    scores = 4 * context * cfg.num_heads * dh  # q.k and p.v per token
    return 2.0 * rows * (tokens * cfg.num_layers * (attn + mlp) + scored * d * cfg.vocab_size) + \
        rows * tokens * cfg.num_layers * scores


def read_config_json(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise wiring.ConfigError(f"--model {model_dir!r}: no config.json there (a Hugging Face model directory, "
                                 "or experiments/configs/shapes/<name>)")
    with open(path) as f:
        return json.load(f)


def _needed_bytes(message: str) -> int:
    """The bytes an out-of-memory compile error says a program needs (XLA prints 1024-based units)."""
    import re

    found = re.search(r"(?:HLO temporaries|Used) \(?([\d.]+)([KMGT]?)", message)
    if not found:
        return 2**62  # the compiler gave no size: certainly more than any chip
    return int(float(found.group(1)) * 1024 ** "BKMGT".index(found.group(2) or "B"))


def _is_classifier(hf: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Planner:
    """Builds and compiles the programs of one run (`config` resolved by the wiring) for `devices`."""

    def __init__(self, config, model_dir: str, devices, chip: Chip, *, log=print):
        from jaxalign import sharding

        self.online = "task" in config
        self.cfg = wiring.resolve_rl(config) if self.online else wiring.resolve_train(config)
        self.hf = read_config_json(model_dir)
        self.reward_hf = None
        if self.online and self.cfg["reward"].reward_model:
            self.reward_hf = read_config_json(self.cfg["reward"].reward_model)
            if not _is_classifier(self.reward_hf):
                raise wiring.ConfigError(f"config.reward.reward_model {self.cfg['reward'].reward_model!r}: not a "
                                         "sequence-classification (reward) config")
        from jaxalign.models import lora

        # As `wiring.build_model`: adapters (and QLoRA's codes) on the policy; its reference is its own base.
        self.lora = wiring.typed(lora.LoraConfig, getattr(self.cfg["model"], "lora", None) or {}, "model.lora")
        self.mesh = sharding.make_mesh(self.cfg["mesh"], devices=devices)
        self.chip, self.log = chip, log

    # -- shapes --------------------------------------------------------------------------------

    def _abstract(self, hf: dict, remat: str, wrap=None, dtype=None, lora: bool = True):
        """The model of a config.json with shapes only; `dtype`: its parameters' (default `model.dtype`);
        lora: with `model.lora`'s adapters and quantized base (the policy and its copies)."""
        import jax.numpy as jnp
        from flax import nnx

        from jaxalign import models
        from jaxalign.models import lora as lora_lib

        cfg, dtype = models.config_from_hf(hf), jnp.dtype(dtype or self.cfg["model"].dtype)
        value = _is_classifier(hf)

        def build():
            lm = models.Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype, lm_head=not value,
                                    remat=remat)
            if lora and self.lora.rank:
                lora_lib.attach_lora(lm, self.lora, rngs=nnx.Rngs(2))
                lora_lib.quantize_base(lm, self.lora.quantize)
            return wrap(lm) if wrap else (models.with_value_head(lm) if value else lm)

        return nnx.eval_shape(build)

    def _sharded(self, model):
        """(ModelDef, params as sharded ShapeDtypeStructs)."""
        import jax

        from jaxalign import sharding, training

        model_def, params = training.ModelDef.of(model)
        shard = sharding.param_shardings(model, self.mesh)
        return model_def, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       params, shard)

    def _batch(self, layout: dict, rows: int) -> dict:
        """{name: (shape after rows, dtype)} -> ShapeDtypeStructs, rows over the batch axes."""
        import jax

        from jaxalign import sharding

        shards = math.prod(self.mesh.shape[a] for a in sharding.batch_sharding(self.mesh, 1).spec[0])
        if rows % shards:  # what `shard_batch` refuses at run time
            what = "config.algorithm.prompts_per_step (x group_size / minibatches)" if self.online \
                else "config.data.batch_size"
            raise wiring.ConfigError(f"{what}: batches of {rows} rows do not split over data x fsdp = {shards} "
                                     "devices of this topology")
        return {k: jax.ShapeDtypeStruct((rows,) + tuple(s), d, sharding=sharding.batch_sharding(self.mesh, 1 + len(s)))
                for k, (s, d) in layout.items()}

    def _train_state(self, trained, optimizer):
        import jax
        import jax.numpy as jnp

        from jaxalign import sharding, training

        model_def, params = self._sharded(trained)
        # As `training.init_train_state`: moments for the trainable params only.
        trained = model_def.split_trainable(params)[0]
        opt = jax.eval_shape(optimizer.init, trained)
        o_sh = sharding.opt_state_shardings(opt, jax.tree.map(lambda x: x.sharding, trained), self.mesh)
        opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, o_sh)
        rep = sharding.replicated(self.mesh)
        scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
        state = training.TrainState(params, opt, scalar((), jnp.int32), scalar((2,), jnp.uint32),
                                    scalar((), jnp.int32))
        return model_def, state

    # -- compiling -----------------------------------------------------------------------------

    def _compile(self, name: str, lowered, *, flops: float | None = None, runs: int = 1, resident: int = 0,
                 options=None) -> Program:
        """Compiles one program and reads its analyses. flops: the model FLOPs of one run over all
        chips (`forward_flops`); None: XLA's count (right for a program without loops)."""
        from jax.errors import JaxRuntimeError

        t0 = time.perf_counter()
        self.log(f"[plan] compiling {name} ...", flush=True)
        try:
            compiled = lowered.compile(options)
        except JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # XLA:TPU refuses a program whose temporaries exceed the chip's HBM; the message says how much.
            # Its arguments are counted as the resident ones only: the batch is unknown, and small.
            seconds, line = time.perf_counter() - t0, str(e).splitlines()[0]
            self.log(f"[plan] {name} does not fit: {line}", flush=True)
            return Program(name, resident, _needed_bytes(line), 0, 0, 0.0, 0.0, seconds, runs, resident, line)
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.log(f"[plan] compiled {name} in {seconds:.1f} s", flush=True)
        xla_flops = float(cost.get("flops", 0.0))
        per_chip = xla_flops if flops is None else flops / len(self.mesh.devices.flat)
        moved = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        estimate = max(per_chip / self.chip.flops, moved / self.chip.bandwidth)
        return Program(name, int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes),
                       int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes), per_chip, estimate, seconds,
                       runs, resident, xla_flops=xla_flops, xla_optimal_s=float(cost.get("optimal_seconds", 0.0)))

    def train_programs(self, *, remat: str, micro_batches: int) -> tuple[list[Program], dict]:
        """The train step's programs and the resident bytes of its state."""
        from jaxalign import training

        cfg = self.cfg
        optimizer = training.make_optimizer(cfg["optim"])
        trained = self._abstract(self.hf, remat, wrap=self._trained_wrap())
        model_def, state = self._train_state(trained, optimizer)
        loss_fn, batch, options, runs, forward = self._loss_and_batch()
        # The backward pass costs two forwards; `full` remat runs the forward once more; a LoRA DPO
        # reference computed in the step (the base, adapters off) one more.
        flops = forward * (4 if remat == "full" else 3) + (forward if self._reference_in_step() else 0)
        train = dataclasses.replace(cfg["train"], micro_batches=micro_batches)
        step = wiring.build_train_step(loss_fn, optimizer, state, model_def, train)
        lowered = step.lower(state, batch, **options)
        state_bytes = per_device_bytes(state)
        names = ("train_step",) if len(lowered) == 1 else ("train_step.gradient", "train_step.update")
        from jaxalign.host import train_step_compiler_options

        opts = (train_step_compiler_options("tpu"), None)
        # A separate update program has no loop: XLA's own count is right there.
        programs = [self._compile(n, low, flops=f, runs=runs, resident=state_bytes, options=o)
                    for n, low, o, f in zip(names, lowered, opts, (flops, None))]
        resident = {"params": per_device_bytes(state.params), "optimizer_state": per_device_bytes(state.opt_state)}
        return programs, resident

    def _reference_in_step(self) -> bool:
        """DPO with LoRA and no precomputed table: the step runs the base as the reference (`with_base_reference`)."""
        return (not self.online and self.cfg["name"] == "dpo" and self.cfg["algorithm"].needs_reference
                and bool(self.lora.rank) and not self.cfg["precompute_reference"])

    def _trained_wrap(self):
        from jaxalign import models

        if not self.online:
            return (lambda lm: models.with_value_head(lm, init="reward")) if self.cfg["name"] == "reward_model" else None
        algo = self.cfg["algorithm"]
        if not algo.uses_critic:
            return None
        from jaxalign.algorithms.ppo import ActorCritic

        return lambda lm: ActorCritic(lm, shared=algo.critic == "shared")

    def _loss_and_batch(self):
        """(loss_fn, abstract batch, static options, runs per training step, forward FLOPs) of the train step."""
        import numpy as np

        cfg, i32, f32 = self.cfg, np.int32, np.float32
        chunk = cfg["train"].logprob_chunk
        if self.online:
            from jaxalign.algorithms import onpolicy

            algo, sampling = cfg["algorithm"], cfg["sampling"]
            rows = algo.prompts_per_step * algo.group_size // algo.minibatches
            layout = onpolicy.batch_layout(algo, sampling, cfg["task"].max_prompt_length)
            t, n = cfg["task"].max_prompt_length + sampling.max_new_tokens, sampling.max_new_tokens
            forward = self._forward(rows, t, scored=n) + (self._forward(rows, t, scored=0) if algo.uses_critic else 0)
            return (onpolicy.make_loss_fn(algo, sampling, logprob_chunk=chunk), self._batch(layout, rows), {},
                    algo.mu * algo.minibatches, forward)
        from jaxalign.algorithms import dpo, reward_model, sft

        name, t, b = cfg["name"], cfg["data"].max_length, cfg["data"].batch_size
        seq = {k: ((t,), i32) for k in ("tokens", "loss_mask", "attention_mask", "segment_ids", "positions")}
        if name == "sft":
            return (functools.partial(sft.sft_loss_fn, logprob_chunk=chunk), self._batch({**seq, "index": ((), i32)}, b),
                    {}, 1, self._forward(b, t, scored=t))
        layout = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in seq.items()}
        layout["index"] = ((), i32)
        if name == "reward_model":
            return reward_model.reward_loss_fn, self._batch(layout, b), {}, 1, self._forward(2 * b, t, scored=0)
        loss_fn = dpo.make_dpo_loss_fn(cfg["algorithm"], logprob_chunk=chunk)
        if self._reference_in_step():
            loss_fn = dpo.with_base_reference(loss_fn, logprob_chunk=chunk)
        elif cfg["algorithm"].needs_reference:
            layout.update(ref_chosen_logps=((), f32), ref_rejected_logps=((), f32))
        # last=None scores all T - 1 columns: the bound over the batcher's score_width.
        return loss_fn, self._batch(layout, b), {}, 1, self._forward(2 * b, t, scored=t)

    def _forward(self, rows: int, tokens: int, *, scored: int, context: int | None = None, hf=None) -> float:
        from jaxalign import models

        return forward_flops(models.config_from_hf(hf or self.hf), rows, tokens, context=context or tokens,
                             scored=scored)

    def other_programs(self) -> tuple[list[Program], dict]:
        """Every program besides the train step, and the resident bytes of the frozen models."""
        if self.online:
            return self._rollout_programs()
        cfg = self.cfg
        if cfg["name"] != "dpo" or not cfg["algorithm"].needs_reference or self._reference_in_step():
            return [], {}
        import jax

        from jaxalign.algorithms import dpo
        from jaxalign.models import lora as lora_lib

        model_def, params = self._sharded(self._abstract(self.hf, "none"))
        _, batch, _, _, forward = self._loss_and_batch()
        batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        chunk = cfg["train"].logprob_chunk

        def ref(p, b):
            with lora_lib.adapters_off(m := model_def.merge(p)):  # a LoRA policy's base: its reference
                return dpo.pair_logprobs(m, b, logprob_chunk=chunk)[:2]

        size = per_device_bytes(params)
        program = self._compile("reference_logprobs", jax.jit(ref).lower(params, batch), flops=forward, resident=size)
        # A precomputed reference runs once before training and is then freed; a LoRA reference is
        # the policy's own params (counted in the train state).
        return [program], ({} if cfg["precompute_reference"] or self.lora.rank else {"reference": size})

    def _rollout_programs(self) -> tuple[list[Program], dict]:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jaxalign import sharding
        from jaxalign.algorithms.common import response_logprobs
        from jaxalign.models import last_token_scores, with_value_head
        from jaxalign.models import lora as lora_lib
        from jaxalign.sampling.sampler import expand_cache

        cfg = self.cfg
        algo, g = cfg["algorithm"], cfg["algorithm"].group_size
        b, p, n = algo.prompts_per_step, cfg["task"].max_prompt_length, cfg["sampling"].max_new_tokens
        rows, t = b * g, p + n
        model_def, params = self._sharded(self._abstract(self.hf, "none"))
        policy_bytes = per_device_bytes(params)
        i32 = np.int32
        prompts = self._batch({"tokens": ((p,), i32), "mask": ((p,), i32)}, b)
        cache_sh, cache_shapes = self._cache_shardings(model_def, params, rows, t)

        def prefill(params, tokens, mask):
            """The sampler's first program: the prompts through the model into a cache, rows repeated G times."""
            m = model_def.merge(params)
            h, cache = m.hidden_states(tokens, attention_mask=mask, cache=m.init_cache(b, p))
            return jnp.repeat(m.logits(h[:, -1:])[:, 0], g, axis=0), expand_cache(cache, g, t)

        def decode(params, cache, last, key):
            """One token for every row: the body of the sampler's decode loop."""
            m = model_def.merge(params)
            h, cache = m.hidden_states(last[:, None], cache=cache)
            return jax.random.categorical(key, m.logits(h)[:, 0]).astype(jnp.int32), cache

        row_sh = sharding.batch_sharding(self.mesh, 1)
        rep = sharding.replicated(self.mesh)
        programs = [self._compile("sampler.prefill", jax.jit(prefill, out_shardings=(row_sh, cache_sh)).lower(
            params, prompts["tokens"], prompts["mask"]), flops=self._forward(b, p, scored=1), resident=policy_bytes)]
        last = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row_sh)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
        cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache_shapes, cache_sh)
        decode_jit = jax.jit(decode, out_shardings=(row_sh, cache_sh), donate_argnums=(1,))
        programs.append(self._compile("sampler.decode", decode_jit.lower(params, cache, last, key), runs=n - 1,
                                      flops=self._forward(rows, 1, scored=1, context=t), resident=policy_bytes))
        seqs = self._batch({k: ((t,), i32) for k in ("tokens", "attention_mask", "loss_mask")}, rows)
        temperature, chunk = cfg["sampling"].temperature, cfg["train"].logprob_chunk

        def logprobs(params, batch, base=False):
            m = model_def.merge(params)
            with lora_lib.adapters_off(m) if base else contextlib.nullcontext():
                return response_logprobs(m, batch, temperature=temperature, last=n, logprob_chunk=chunk)[0]

        resident, lora_ref = {}, algo.needs_reference and bool(self.lora.rank)
        if algo.needs_reference and not lora_ref:  # a copy; a LoRA policy's reference is its own base
            resident["reference"] = policy_bytes
        name = "logprobs (old policy, reference)" if algo.needs_reference and not lora_ref else "logprobs (old policy)"
        flops = self._forward(rows, t, scored=n)
        programs.append(self._compile(name, jax.jit(logprobs).lower(params, seqs), flops=flops,
                                      runs=2 if resident else 1, resident=policy_bytes))
        if lora_ref:
            programs.append(self._compile("logprobs (reference: base, adapters off)", jax.jit(
                functools.partial(logprobs, base=True)).lower(params, seqs), flops=flops, resident=policy_bytes))
        scorers = []
        if algo.uses_critic:
            scorers.append(("critic.values", self._abstract(self.hf, "none", wrap=with_value_head), self.hf, False))
        if self.reward_hf is not None:
            # RewardModelScorer.from_pretrained loads float32 parameters, whatever model.dtype says.
            scorers.append(("reward_model.scores", self._abstract(self.reward_hf, "none", dtype="float32", lora=False),
                            self.reward_hf, True))
        for name, model, hf, frozen in scorers:
            value_def, value_params = self._sharded(model)
            size = per_device_bytes(value_params)
            if frozen:
                resident["reward_model"] = size

            def scores(params, batch, value_def=value_def, last_only=frozen):
                values = value_def.merge(params)(batch["tokens"], attention_mask=batch["attention_mask"])
                return last_token_scores(values, batch["attention_mask"]) if last_only else values[:, :-1]

            programs.append(self._compile(name, jax.jit(scores).lower(value_params, seqs), resident=size,
                                          flops=self._forward(rows, t, scored=0, hf=hf)))
        return programs, resident

    def _cache_shardings(self, model_def, params, rows: int, length: int):
        """The KV cache's shardings: rows over the batch axes, KV heads over `tensor` (logical names)."""
        import jax
        from jax.sharding import NamedSharding

        from jaxalign import sharding
        from jaxalign.sampling.sampler import CACHE_AXES

        shapes = jax.eval_shape(lambda p: model_def.merge(p).init_cache(rows, length), params)
        axes = {"k": CACHE_AXES, "v": CACHE_AXES, "valid": ("batch", None), "next_pos": ("batch",), "index": ()}

        def one(name, x):
            return NamedSharding(self.mesh, sharding.spec_for(axes[name], x.shape, self.mesh))

        return type(shapes)(**{f: one(f, getattr(shapes, f)) for f in axes}), shapes
