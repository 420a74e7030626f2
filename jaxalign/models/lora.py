"""LoRA adapters and QLoRA's quantized frozen base, written in NNX on the stacked layer layout.

    attach_lora(model, LoraConfig(rank=8, alpha=16, targets=("q", "v")), rngs=nnx.Rngs(0))
    logits = model(tokens)                       # the adapted policy
    with adapters_off(model):
        ref_logits = model(tokens)               # the base: the reference, no second copy

A projection `y = x W` of a target gains `s · (x A) B` with `A: [in..., r]`,
`B: [r, out...]`, `s = alpha / rank` (Hu et al. 2021, "LoRA"). On the stacked
layout (`Transformer.layers` holds `[L, ...]` parameters) the adapters are
stacked too, `A: [L, in..., r]`, `B: [L, r, out...]`, and the layer scan slices
them with the weights. A starts uniform in ±1/sqrt(fan_in) (PEFT's kaiming
init), B at zero, so an adapted model starts equal to its base.

Adapters are `LoraParam`s, a subclass of `nnx.Param`: they travel with the
other Params (train state, sampler, sharding table) and the filter `LoraParam`
picks them alone. Every Param of the model when adapters are attached is
marked frozen (metadata `frozen=True`); the train step differentiates and
optimises only the unmarked ones (`training.ModelDef.trainable`), so the base takes no
gradient and no optimizer memory. QLoRA (Dettmers et al. 2023) quantizes the
frozen projection weights blockwise (`quantize_base`): int8 absmax codes, or
NF4 codes packed two per byte, each block of `BLOCK` values with its own absmax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# Target name -> (sub-module of a Block, number of input axes of its weight after the layer axis).
TARGETS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
           "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1)}
QUANTIZE = ("none", "int8", "nf4")
BLOCK = 64  # values per quantization block (QLoRA's block size)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`model.lora`: rank 0 = no adapters; alpha: the scale numerator (s = alpha / rank);
    targets: projection names from `TARGETS`; quantize: the frozen base's storage (`QUANTIZE`)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    quantize: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0, got {self.rank}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"model.lora.targets {list(self.targets)}: each must be one of {list(TARGETS)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"model.lora.quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.quantize != "none" and self.rank == 0:
            raise ValueError("model.lora.quantize needs model.lora.rank > 0 (a quantized base cannot train)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraParam(nnx.Param):
    """A LoRA adapter matrix (A or B); the only kind of parameter that trains in a LoRA model."""


# ---------------------------------------------------------------------------------------------
# The projection every layer calls.


def project(module: nnx.Module, name: str, spec: str, x: Array) -> Array:
    """`einsum(spec, x, W)` for the weight `module.<name>`, plus its adapter's `s · (x A) B`.

    The weight is dequantized first when QLoRA stores it as codes; the adapter
    is skipped inside `adapters_off`. x: [..., in...]; returns [..., out...].
    """
    absmax = getattr(module, f"{name}_absmax", None)
    if absmax is None:
        y = jnp.einsum(spec, x, getattr(module, name)[...].astype(x.dtype))
    else:
        kind, axis = _code_layout(getattr(module, name))

        # Recomputed in the backward pass: saved for it, each scanned layer's dequantized weight
        # would add up to a float copy of the whole base (measured in docs/lora.md).
        @jax.checkpoint
        def dequantized_einsum(x, codes, absmax):
            return jnp.einsum(spec, x, dequantize(codes, absmax, kind, axis=axis).astype(x.dtype))

        y = dequantized_einsum(x, getattr(module, name)[...], absmax[...])
    lora = getattr(module, "lora", None)
    if lora is None or not lora.enabled or name not in lora.targets:
        return y
    a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
    h = jnp.tensordot(x, a.astype(x.dtype), axes=a.ndim - 1)  # [..., r]
    return y + jnp.tensordot(h, b.astype(x.dtype), axes=1) * jnp.asarray(lora.scaling, x.dtype)


def weight(module: nnx.Module, name: str, dtype) -> Array:
    """The weight `module.<name>` in `dtype`, dequantized when stored as QLoRA codes."""
    w = getattr(module, name)[...]
    q = getattr(module, f"{name}_absmax", None)
    if q is None:
        return w.astype(dtype)
    kind, axis = _code_layout(getattr(module, name))
    return dequantize(w, q[...], kind, axis=axis).astype(dtype)


def _code_layout(var: nnx.Variable) -> tuple[str, int]:
    """(kind, block axis) of a Param of QLoRA codes, stacked or one layer's slice."""
    meta = var.get_metadata()
    # Inside the layer scan the codes are one layer's slice: the stacked axis index moves down by one.
    return meta["quantized"], meta["block_axis"] - (len(meta["axes"]) - var[...].ndim)


@dataclasses.dataclass(frozen=True)
class _ModuleLora:
    """What a module with adapters knows statically (part of its graph definition)."""

    targets: tuple[str, ...]
    scaling: float
    enabled: bool = True


# ---------------------------------------------------------------------------------------------
# Attaching, switching off, merging.


def _sites(model: nnx.Module, targets) -> list[tuple[nnx.Module, str, int]]:
    """(module, weight name, input axes) of every target projection of a stacked Transformer."""
    block = getattr(model, "layers", None)
    if block is None or isinstance(block, (list, nnx.List)):
        raise TypeError("LoRA needs a Transformer with stacked layers (model.layers one Block of [L, ...] params)")
    out = []
    for t in targets:
        sub, n_in = TARGETS[t]
        module = getattr(block, sub)
        if not hasattr(module, t):
            raise ValueError(f"model.lora.targets: {t!r} is not a projection of this model ({model.cfg.family})")
        out.append((module, t, n_in))
    return out


def attach_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Adds adapters to the target projections of `model` (in place) and freezes every other Param.

    The model then computes the adapted policy; `quantize_base` may follow.
    rank 0 leaves the model as it is.
    """
    if cfg.rank == 0:
        return model
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_metadata(frozen=True)
    by_module: dict[int, list[str]] = {}
    for module, name, n_in in _sites(model, cfg.targets):
        w = getattr(module, name)
        axes = tuple(w.get_metadata().get("axes") or (None,) * w.ndim)
        shape = w.shape
        a_shape = shape[: 1 + n_in] + (cfg.rank,)
        b_shape = (shape[0], cfg.rank) + shape[1 + n_in:]
        bound = 1.0 / math.sqrt(math.prod(shape[1: 1 + n_in]))
        a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
        setattr(module, f"{name}_lora_a", LoraParam(a.astype(w.dtype), axes=axes[: 1 + n_in] + (None,)))
        setattr(module, f"{name}_lora_b", LoraParam(jnp.zeros(b_shape, w.dtype), axes=(axes[0], None) + axes[1 + n_in:]))
        by_module.setdefault(id(module), [module, []])[1].append(name)
    for module, names in by_module.values():
        module.lora = _ModuleLora(tuple(names), cfg.scaling)
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(v, LoraParam) for _, v in nnx.iter_graph(model))


def _lora_modules(model: nnx.Module) -> list[nnx.Module]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and getattr(m, "lora", None) is not None]


@contextlib.contextmanager
def adapters_off(model: nnx.Module):
    """Within the block, `model` computes its frozen base (the reference policy of DPO, GRPO, PPO).

    The switch is a static attribute of the modules, so a function traced
    inside the block compiles the base's program, outside it the adapted one.
    """
    modules = _lora_modules(model)
    for m in modules:
        m.lora = dataclasses.replace(m.lora, enabled=False)
    try:
        yield model
    finally:
        for m in modules:
            m.lora = dataclasses.replace(m.lora, enabled=True)


def base_view(model: nnx.Module) -> nnx.Module:
    """A module sharing `model`'s arrays that computes the base (adapters off), for a jitted reference."""
    view = nnx.merge(*nnx.split(model))
    for m in _lora_modules(view):
        m.lora = dataclasses.replace(m.lora, enabled=False)
    return view


def merged(model: nnx.Module) -> nnx.Module:
    """A plain model (no adapters, float weights) computing what `model` computes: W + s·A B.

    For export (`save_hf`); `model` is left unchanged.
    """
    view = nnx.merge(*nnx.split(model))
    for m in _lora_modules(view):
        for name in m.lora.targets:
            a, b = getattr(m, f"{name}_lora_a")[...], getattr(m, f"{name}_lora_b")[...]
            wide = jnp.promote_types(a.dtype, jnp.float32)
            delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a.astype(wide), b.astype(wide))
            dense = weight(m, name, wide) + m.lora.scaling * delta
            _replace_weight(m, name, dense)
            delattr(m, f"{name}_lora_a")
            delattr(m, f"{name}_lora_b")
        m.lora = None
    for _, m in list(nnx.iter_graph(view)):
        if isinstance(m, nnx.Module):
            for name in [n for n in vars(m) if n.endswith("_absmax")]:
                base = name[: -len("_absmax")]
                _replace_weight(m, base, weight(m, base, jnp.float32))
    for _, var in nnx.iter_graph(view):
        if isinstance(var, nnx.Param) and var.get_metadata().get("frozen"):
            var.set_metadata(frozen=False)
    return view


def _is_quantized(module, name) -> bool:
    return getattr(module, f"{name}_absmax", None) is not None


def _replace_weight(module, name: str, dense: Array) -> None:
    """module.<name> := a float Param `dense` with the original axes (codes and absmax dropped)."""
    old = getattr(module, name)
    meta = {k: v for k, v in old.get_metadata().items() if k in ("axes", "frozen")}
    dtype = jnp.float32 if jnp.issubdtype(old[...].dtype, jnp.integer) else old[...].dtype
    setattr(module, name, nnx.Param(dense.astype(dtype), **meta))
    if _is_quantized(module, name):
        delattr(module, f"{name}_absmax")


# ---------------------------------------------------------------------------------------------
# QLoRA: blockwise quantization of the frozen base.


def _nf4_table() -> np.ndarray:
    """The 16 NormalFloat-4 levels (Dettmers et al. 2023, QLoRA §3): quantiles of N(0, 1) with an
    exact zero, 8 on the positive side and 7 on the negative, scaled to [-1, 1]."""
    n, offset = statistics.NormalDist(), 0.5 * (1 / 32 + 1 / 30)  # the paper's offset δ
    pos = [n.inv_cdf(p) for p in np.linspace(1 - offset, 0.5, 9)[:-1]]
    neg = [-n.inv_cdf(p) for p in np.linspace(1 - offset, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg))
    return v / np.abs(v).max()


NF4 = _nf4_table()


def _blocks(x: Array, axis: int, block: int) -> Array:
    """[..., n, ...] -> [..., n / block, block, ...] along `axis`."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:])


def quantize(w: Array, kind: str, *, axis: int, block: int = BLOCK) -> tuple[Array, Array]:
    """Blockwise absmax quantization of `w` along `axis` -> (codes, absmax).

    int8: codes = round(127 w / absmax) in [-127, 127] (int8, `w`'s shape);
    error ≤ absmax / 254 per value. nf4: codes = the nearest of the 16 `NF4`
    levels to w / absmax, two 4-bit codes per uint8 (`w`'s shape with `axis`
    halved); error ≤ absmax · (largest gap between levels) / 2.
    absmax: float32, `w`'s shape with `axis` divided by `block`.
    """
    if w.shape[axis] % block:
        raise ValueError(f"quantize: axis {axis} of size {w.shape[axis]} does not split into blocks of {block}")
    wb = _blocks(w.astype(jnp.float32), axis, block)
    absmax = jnp.max(jnp.abs(wb), axis=axis + 1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    if kind == "int8":
        codes = jnp.clip(jnp.round(wb / safe * 127), -127, 127).astype(jnp.int8).reshape(w.shape)
    elif kind == "nf4":
        table = jnp.asarray(NF4, jnp.float32)
        idx = jnp.argmin(jnp.abs((wb / safe)[..., None] - table), axis=-1).astype(jnp.uint8).reshape(w.shape)
        pairs = _blocks(idx, axis, 2)
        lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
        codes = lo | (hi << 4)
    else:
        raise ValueError(f"quantize: kind must be 'int8' or 'nf4', got {kind!r}")
    return codes, jnp.squeeze(absmax, axis + 1)


def dequantize(codes: Array, absmax: Array, kind: str, *, axis: int, block: int = BLOCK) -> Array:
    """float32 values of `quantize`'s (codes, absmax)."""
    if kind == "int8":
        values = codes.astype(jnp.float32) / 127
    else:
        both = jnp.stack([codes & 0xF, codes >> 4], axis=axis + 1)
        idx = both.reshape(codes.shape[:axis] + (2 * codes.shape[axis],) + codes.shape[axis + 1:])
        values = jnp.asarray(NF4, jnp.float32)[idx.astype(jnp.int32)]
    vb = _blocks(values, axis, block) * jnp.expand_dims(absmax, axis + 1)
    return vb.reshape(values.shape)


def block_axis(shape: tuple[int, ...], n_in: int, block: int = BLOCK) -> int | None:
    """The axis of a stacked `[L, in..., out...]` weight quantized in blocks: the first input
    axis of a size divisible by `block`, else the first output axis; None if there is none."""
    order = list(range(1, 1 + n_in)) + list(range(1 + n_in, len(shape)))
    return next((ax for ax in order if shape[ax] % block == 0), None)


def quantize_base(model: nnx.Module, kind: str, *, block: int = BLOCK) -> nnx.Module:
    """Stores every projection weight of `model`'s layers (all of `TARGETS`) as `kind` codes (in place).

    `module.<name>` becomes the codes (a frozen Param, metadata `quantized`,
    `block_axis`) and `module.<name>_absmax` their scales; `project`
    dequantizes them on the fly. Embeddings, norms and the LM head stay float.
    """
    if kind == "none":
        return model
    if not has_lora(model):
        raise ValueError("model.lora.quantize needs adapters first (attach_lora): a quantized base cannot train")
    names = [t for t in TARGETS if hasattr(getattr(model.layers, TARGETS[t][0]), t)]
    for module, name, n_in in _sites(model, names):
        w = getattr(module, name)
        ax = block_axis(w.shape, n_in, block)
        if ax is None:
            raise ValueError(f"model.lora.quantize: layers.{TARGETS[name][0]}.{name} of shape {w.shape} has no "
                             f"axis divisible by the block size {block}")
        codes, absmax = quantize(w[...], kind, axis=ax, block=block)
        axes = tuple(w.get_metadata().get("axes") or (None,) * w.ndim)
        scale_axes = axes[:ax] + (None,) + axes[ax + 1:]
        setattr(module, name, nnx.Param(codes, axes=axes, frozen=True, quantized=kind, block_axis=ax))
        setattr(module, f"{name}_absmax", nnx.Param(absmax, axes=scale_axes, frozen=True))
    return model


def lora_config_of(model: nnx.Module) -> tuple[int, float, tuple[str, ...]]:
    """(rank, scaling, targets) of an adapted model."""
    modules = _lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    targets = tuple(t for t in TARGETS if any(t in m.lora.targets for m in modules))
    m = modules[0]
    rank = getattr(m, f"{m.lora.targets[0]}_lora_a").shape[-1]
    return rank, m.lora.scaling, targets


__all__ = ["BLOCK", "NF4", "QUANTIZE", "TARGETS", "LoraConfig", "LoraParam", "adapters_off", "attach_lora",
           "base_view", "block_axis", "dequantize", "has_lora", "lora_config_of", "merged", "project",
           "quantize", "quantize_base", "weight"]
