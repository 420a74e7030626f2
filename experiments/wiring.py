"""One wiring module: config sections -> typed configs -> the parts of a run.

Every section of an experiment config is unpacked into a frozen dataclass
(`typed`): the dataclass's fields are the section's keys, one spelling from the
config file to the loss keyword. Config files build their sections from the
same dataclasses (`section`, `preset_section`), so every field is reachable from
the command line as `--config.<section>.<field>`, and a key the dataclass does
not have is refused in one line naming the section, the key and the valid keys.

The entry scripts (`experiments/train.py`, `experiments/rl.py`), the built-in
comparison and the benchmark runner all build their models, data, optimizer,
train step and checkpointer here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Mapping

from ml_collections import ConfigDict, config_dict


class ConfigError(ValueError):
    """A config problem, reported by the entry scripts as one line (no traceback)."""


# ---------------------------------------------------------------------------
# Sections of an experiment config that are not a library object's config.


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`config.model`: a local Hugging Face directory (`path`), a `.gguf` file or
    `"smollm2"`; or, when `path` is empty, a tiny random model of `family` sized
    by `overrides` (Hugging Face config fields). `tokenizer`: a local directory
    (default: `path`). `dtype`: the parameters' dtype; `compute_dtype`: the
    activations' and matmuls' (empty: `dtype`; float32 + bfloat16 is float32
    master weights, docs/training.md "Mixed precision"). `remat`: what the
    backward pass keeps of each layer (none, full, save_dots; docs/scale.md)."""

    path: str = ""
    tokenizer: str = ""
    family: str = "llama"
    dtype: str = "float32"
    compute_dtype: str = ""
    remat: str = "none"
    seed: int = 0
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256))
    # LoRA / QLoRA (`jaxalign.models.lora.LoraConfig`): rank 0 = off; alpha; targets; quantize none|int8|nf4.
    lora: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(
        rank=0, alpha=16.0, targets=["q", "k", "v", "o", "gate", "up", "down"], quantize="none"))


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`config.data`: local JSONL/Parquet files built once through TFDS into `data_dir`.

    overlong: `truncate` or `drop` samples over `max_length` tokens. empty:
    what to do with an empty response field (`error`, `drop`, `keep`).
    buckets: pad batch widths up to a multiple of this (0: the longest row).
    """

    train: str = ""
    test: str = ""
    data_dir: str = "runs/tfds"
    max_length: int = 256
    overlong: str = "truncate"
    empty: str = "error"
    batch_size: int = 8
    buckets: int = 32


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`config.train`: run length, gradient accumulation, the NaN policy, logging.

    micro_batches: split each batch into this many micro-batches (exact
    accumulation). nan_policy: `skip` drops a non-finite update, `stop` ends
    the run with an error. max_skipped_fraction: with `skip`, end the run
    with an error once more than this fraction of its updates were skipped
    (None: never). logprob_chunk: positions per chunk of the LM head and
    log-softmax wherever log-probs come from a model (`jaxalign.models.logprobs`):
    unset, one chunk's float32 logits stay within 256 MiB; 0 computes them whole.
    """

    steps: int = 1000
    micro_batches: int = 1
    nan_policy: str = "skip"
    max_skipped_fraction: float | None = 0.5
    logprob_chunk: int | None = None
    log_every: int = 10
    eval_every: int = 100


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """`config.checkpoint`: save every `every` steps, keep the newest `keep`. on_corrupt: what
    a resume does with a damaged newest step, `fallback` (to the newest intact one, with a
    warning) or `error`."""

    every: int = 100
    keep: int = 3
    on_corrupt: str = "fallback"


# ---------------------------------------------------------------------------
# Typed configs <-> config sections.


def _field_type(hint) -> type | None:
    """The scalar type ml_collections should parse a field's overrides as."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _field_type(args[0]) if len(args) == 1 else None
    return hint if isinstance(hint, type) else None


def _value(hint, value):
    if isinstance(value, Mapping):
        return ConfigDict(dict(value))
    if value is None:
        kind = _field_type(hint)
        return config_dict.placeholder(kind) if kind in (int, float, str, bool) else None
    if isinstance(value, tuple):
        return list(value)
    return value


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _refuse_unknown(values, names, where: str) -> None:
    """One line naming the section, the first key `names` lacks, and the valid keys."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(names))}")


def section(cls, **values) -> ConfigDict:
    """A config section holding every field of dataclass `cls`: its defaults, then `values`.

    Fields whose value is None become typed placeholders, so `--config.x.f=0.3`
    parses as the field's type.
    """
    hints = typing.get_type_hints(cls)
    _refuse_unknown(values, hints, cls.__name__)
    merged = {**_defaults(cls), **values}
    return ConfigDict({k: _value(hints[k], v) for k, v in merged.items()})


def preset_section(cls, name: str, **values) -> ConfigDict:
    """An algorithm section: `name` (the preset) and every field of `cls`, unset.

    An unset field (None) takes the preset's value when the section is
    resolved, so `--config.algorithm.name=gspo` gives GSPO's own clip range,
    not the defaults of the file's preset; a field set here or on the command
    line overrides the preset.
    """
    hints = typing.get_type_hints(cls)
    _refuse_unknown(values, hints, cls.__name__)
    return ConfigDict({"name": name, **{key: _value(hint, values.get(key)) for key, hint in hints.items()}})


def as_dict(sec) -> dict:
    """A config section (ConfigDict, mapping or None) as a plain dict."""
    if sec is None:
        return {}
    if isinstance(sec, ConfigDict):
        return sec.to_dict()
    return dict(sec)


def typed(cls, sec, where: str, **extra):
    """`cls(**section, **extra)`; a key `cls` lacks is refused in one line.

    where: the section's name in the config (`optim`, `algorithm`), for the message.
    """
    values = {**as_dict(sec), **extra}
    _refuse_unknown(values, {f.name for f in dataclasses.fields(cls)}, f"config.{where}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{where}: {e}") from None


def set_fields(sec) -> dict:
    """The fields of an algorithm section that are set (not None), without `name`."""
    return {k: v for k, v in as_dict(sec).items() if v is not None and k != "name"}


def to_jsonable(obj):
    """Dataclasses, mappings and sequences as JSON-serialisable values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, ConfigDict):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_config(workdir: str, resolved: Mapping[str, Any]) -> str:
    """Writes the run's resolved config (every section as the run uses it) to `<workdir>/config.json`."""
    import jax

    path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(to_jsonable(resolved), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    return path


def check_keys(config, valid: tuple[str, ...]) -> None:
    """Refuses a top-level config key the entry script does not read."""
    unknown = sorted(set(config.keys()) - set(valid))
    if unknown:
        raise ConfigError(f"config: unknown section {unknown[0]!r}; valid: {', '.join(sorted(valid))}")


# ---------------------------------------------------------------------------
# experiments/train.py: SFT, reward model, DPO.

OFFLINE = ("sft", "reward_model", "dpo")
TRAIN_KEYS = ("seed", "workdir", "model", "data", "optim", "algorithm", "mesh", "checkpoint", "train")


def offline_section(name: str, **values) -> ConfigDict:
    """`config.algorithm` of experiments/train.py: `name` and, for DPO, every `DPOConfig` field."""
    from jaxalign.algorithms.dpo import DPOConfig

    if name not in OFFLINE:
        raise ConfigError(f"config.algorithm.name {name!r}: experiments/train.py runs {', '.join(OFFLINE)}")
    if name != "dpo":
        return ConfigDict(dict(name=name, **values))
    precompute = values.pop("precompute_reference", True)
    return ConfigDict(dict(name=name, precompute_reference=precompute, **section(DPOConfig, **values)))


def resolve_train(config) -> dict[str, Any]:
    """The typed sections of an experiments/train.py config (what `config.json` records)."""
    from jaxalign import sharding, training
    from jaxalign.algorithms.dpo import DPOConfig

    check_keys(config, TRAIN_KEYS)
    algo = as_dict(config.algorithm)
    name = algo.pop("name", None)
    if name not in OFFLINE:
        raise ConfigError(f"config.algorithm.name {name!r}: experiments/train.py runs {', '.join(OFFLINE)} "
                          "(on-policy algorithms run with experiments/rl.py)")
    precompute = algo.pop("precompute_reference", True) if name == "dpo" else None
    if name == "dpo":
        algorithm = typed(DPOConfig, algo, "algorithm")
    elif algo:
        raise ConfigError(f"config.algorithm: unknown key {sorted(algo)[0]!r}; {name} takes only 'name'")
    else:
        algorithm = None
    return dict(
        seed=config.seed, workdir=config.workdir, name=name, algorithm=algorithm, precompute_reference=precompute,
        model=typed(ModelSection, config.model, "model"), data=typed(DataSection, config.data, "data"),
        optim=typed(training.OptimConfig, config.optim, "optim"),
        mesh=typed(sharding.MeshConfig, config.mesh, "mesh"),
        checkpoint=typed(CheckpointSection, config.checkpoint, "checkpoint"),
        train=typed(TrainSection, config.train, "train"),
    )


# ---------------------------------------------------------------------------
# experiments/rl.py: every on-policy algorithm, a preset of one driver.


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """`config.task`: where prompts come from.

    kind: `arithmetic` (built-in), `instruct` (built-in, for SmolLM2), `gsm8k`
    (TFDS, from `data_dir`) or `jsonl` (`{"prompt", "answer"}` files `train`,
    `test`). seed, train_prompts, eval_prompts: the built-in tasks' sizes.
    prompt_buckets: pad prompt widths up to a multiple of this (0: longest).
    """

    kind: str = "arithmetic"
    seed: int = 0
    train_prompts: int = 20000
    eval_prompts: int = 1000
    data_dir: str = ""
    train: str = ""
    test: str = ""
    max_prompt_length: int = 8
    prompt_buckets: int = 8
    eval_batch_size: int = 1000


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """`config.reward`: a verifier (`jaxalign.rewards.VERIFIERS` or `instruct`) and/or a
    reward model directory, summed with their weights."""

    verifier: str = "exact_match"
    verifier_weight: float = 1.0
    reward_model: str = ""
    reward_model_weight: float = 1.0


RL_KEYS = ("seed", "workdir", "model", "task", "reward", "algorithm", "sampling", "optim", "mesh", "checkpoint",
           "train")


def onpolicy_algorithm(sec, where: str = "algorithm"):
    """`config.<where>` -> the `OnPolicyConfig` of its preset `name` with the set fields on top."""
    from jaxalign.algorithms import onpolicy

    values = as_dict(sec)
    name = values.pop("name", None)
    if name not in onpolicy.PRESETS:
        raise ConfigError(f"config.{where}.name {name!r}: valid presets: {', '.join(sorted(onpolicy.PRESETS))}")
    _refuse_unknown(values, {f.name for f in dataclasses.fields(onpolicy.OnPolicyConfig)}, f"config.{where}")
    try:
        return onpolicy.preset(name, **set_fields(values))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{where}: {e}") from None


def resolve_rl(config) -> dict[str, Any]:
    """The typed sections of an experiments/rl.py config (what `config.json` records)."""
    from jaxalign import sharding, training
    from jaxalign.algorithms.rollout import SamplingConfig

    check_keys(config, RL_KEYS)
    return dict(
        seed=config.seed, workdir=config.workdir, name=config.algorithm.name,
        algorithm=onpolicy_algorithm(config.algorithm),
        sampling=typed(SamplingConfig, config.sampling, "sampling"),
        model=typed(ModelSection, config.model, "model"), task=typed(TaskSection, config.task, "task"),
        reward=typed(RewardSection, config.reward, "reward"),
        optim=typed(training.OptimConfig, config.optim, "optim"),
        mesh=typed(sharding.MeshConfig, config.mesh, "mesh"),
        checkpoint=typed(CheckpointSection, config.checkpoint, "checkpoint"),
        train=typed(TrainSection, config.train, "train"),
    )


def prompt_records(task: TaskSection, split: str):
    """`{"prompt", "answer"}` records of `split` for `config.task.kind` (None: no such split)."""
    import numpy as np

    from jaxalign import data
    from jaxalign.tasks import arithmetic, instruct

    if task.kind == "instruct":
        return instruct.held_out(task.eval_prompts) if split == "test" else \
            instruct.train_records(task.train_prompts, seed=task.seed)
    if task.kind == "arithmetic":
        problems = (arithmetic.held_out(task.eval_prompts) if split == "test" else
                    arithmetic.sample_problems(np.random.default_rng(task.seed), task.train_prompts))
        return [{"prompt": p, "answer": a} for p, a in zip(problems.prompts, problems.answers)]
    if task.kind == "gsm8k":
        return data.gsm8k_prompts(split, data_dir=task.data_dir or None)
    if task.kind == "jsonl":
        files = {"train": task.train, "test": task.test}[split]
        if not files:
            return None
        return data.prepare("prompt_answer", files, data_dir=task.data_dir)["train"]
    raise ConfigError(f"config.task.kind {task.kind!r}: arithmetic, instruct, gsm8k or jsonl")


def build_reward(reward: RewardSection):
    """The reward function `Rollout -> [R]` of `config.reward`."""
    from jaxalign import rewards
    from jaxalign.tasks import instruct

    fns = []
    if reward.verifier == "instruct":  # reads the rollout (truncation), not just the text
        fns.append((instruct.follows_constraints, reward.verifier_weight))
    elif reward.verifier:
        if reward.verifier not in rewards.VERIFIERS:
            raise ConfigError(f"config.reward.verifier {reward.verifier!r}: valid: instruct, "
                              f"{', '.join(sorted(rewards.VERIFIERS))}")
        fns.append((rewards.from_verifier(rewards.VERIFIERS[reward.verifier]), reward.verifier_weight))
    if reward.reward_model:
        fns.append((rewards.RewardModelScorer.from_pretrained(reward.reward_model), reward.reward_model_weight))
    if not fns:
        raise ConfigError("config.reward: set a verifier or a reward_model")
    return rewards.combine(fns)


def build_onpolicy(algorithm, sampling, model, *, tokenizer, reward_fn, prompts, optimizer, mesh, seed: int,
                   train: TrainSection, reference=None):
    """The ready on-policy run (`onpolicy.build`) with `config.train`'s accumulation and NaN policy."""
    from jaxalign.algorithms import onpolicy

    return onpolicy.build(algorithm, sampling, model, tokenizer=tokenizer, reward_fn=reward_fn, prompts=prompts,
                          optimizer=optimizer, mesh=mesh, seed=seed, reference=reference,
                          train_options=dict(micro_batches=train.micro_batches, nan_policy=train.nan_policy),
                          logprob_chunk=train.logprob_chunk)


# ---------------------------------------------------------------------------
# The parts of a run.


def resolve_model_path(path: str) -> str:
    """A Hugging Face directory for `config.model.path`: `"smollm2"` and `.gguf` files
    are converted once into a cached directory (see `build_model`)."""
    if path == "smollm2" or path.endswith(".gguf"):
        from jaxalign.models import gguf

        source = gguf.smollm2_path() if path == "smollm2" else gguf.Path(path)
        return str(gguf.converted_dir(source))
    return path


def build_model(model_cfg: ModelSection, mesh, *, value_head: bool = False):
    """(model, tokenizer) named by `config.model`: a local HF directory, a `.gguf` file or
    `"smollm2"`, or a tiny random model when `path` is empty."""
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoTokenizer

    from jaxalign import models, sharding
    from jaxalign.models import lora

    dtype = jnp.dtype(model_cfg.dtype)
    compute_dtype = jnp.dtype(model_cfg.compute_dtype or model_cfg.dtype)
    path = resolve_model_path(model_cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or path)
    if path:
        model, _ = models.load_hf(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, tokenizer=tokenizer,
                                  remat=model_cfg.remat)
    else:
        cfg = models.tiny_config(model_cfg.family, vocab_size=len(tokenizer), **dict(model_cfg.overrides))
        model = sharding.create_sharded_model(
            lambda: models.Transformer(cfg, rngs=nnx.Rngs(model_cfg.seed), param_dtype=dtype, dtype=compute_dtype,
                                       remat=model_cfg.remat),
            mesh)
    lora_cfg = typed(lora.LoraConfig, model_cfg.lora, "model.lora")
    if lora_cfg.rank:  # adapters (and QLoRA's codes) built here, then placed by the rules like every Param
        lora.attach_lora(model, lora_cfg, rngs=nnx.Rngs(model_cfg.seed + 2))
        lora.quantize_base(model, lora_cfg.quantize)
        sharding.shard_model(model, mesh)
    if value_head and not isinstance(model, models.ValueModel):
        model = models.with_value_head(model, init="reward", rngs=nnx.Rngs(model_cfg.seed + 1))
    return model, tokenizer


def build_data(data_cfg: DataSection, kind: str, tokenizer, *, seed: int):
    """(train loader, test loader or None) over local JSONL/Parquet files through TFDS."""
    import jax

    from jaxalign import data

    try:
        sources = data.prepare(kind, data_cfg.train, test=data_cfg.test or None, data_dir=data_cfg.data_dir,
                               empty=data_cfg.empty)
    except data.DataError as e:
        hint = "; from the command line: --config.data.empty=drop (or keep)" if "empty=" in str(e) else ""
        raise ConfigError(f"{e}{hint}") from None
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


def build_train_step(loss_fn, optimizer, state, model_def, train_cfg: TrainSection):
    """The jitted train step with the run's accumulation and NaN policy."""
    from jaxalign import training

    return training.make_train_step(loss_fn, optimizer, model_def=model_def,
                                    shardings=training.state_shardings(state),
                                    micro_batches=train_cfg.micro_batches, nan_policy=train_cfg.nan_policy)


def build_checkpointer(workdir: str, ckpt: CheckpointSection):
    from jaxalign import training

    return training.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=ckpt.every, keep=ckpt.keep,
                                 on_corrupt=ckpt.on_corrupt)


def train_kwargs(train_cfg: TrainSection) -> dict:
    """The keywords of `training.train` that come from `config.train`."""
    return dict(num_steps=train_cfg.steps, eval_every=train_cfg.eval_every, log_every=train_cfg.log_every,
                max_skipped_fraction=train_cfg.max_skipped_fraction)
