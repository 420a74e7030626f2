"""DPO and its variants as glue: sequence log-probs of a preference batch -> `jaxalign.losses`.

The reference either runs next to the policy (`reference_logps` per batch)
or is evaluated once over the data (`precompute_reference`), after which it
need not stay in memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algorithms.common import PairStep, pair_options, response_logprobs, sequence_logprob
from jaxalign.losses import DPO_LOSSES, dpo_loss, orpo_loss, simpo_loss


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """`loss_type`: one of `DPO_LOSSES` (`sigmoid`, `robust`, `ipo`, `hinge`) or the
    reference-free `simpo` / `orpo`. `rpo_alpha` > 0 adds α·NLL of the chosen
    answer (Pang et al. 2024), which keeps the chosen log-prob from falling."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    def __post_init__(self):
        valid = tuple(DPO_LOSSES) + ("simpo", "orpo")
        if self.loss_type not in valid:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {valid}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in ("simpo", "orpo")


def pair_logprobs(model, batch: dict, *, last: int | None = None, logprob_chunk: int | None = None):
    """Summed response log-probs and lengths of chosen and rejected: four `[B]` arrays.

    One forward over the `[2B, T]` stack (chosen rows first). With `last`
    (the `score_width` that `collate_preference` computes; see `pair_options`),
    the LM head and softmax run on the last `last` columns only (the
    responses; the prompt's logits are never used), which gives the same sums.
    logprob_chunk: positions per chunk of the LM head and softmax (`response_logprobs`).
    """
    keys = ("tokens", "loss_mask", "attention_mask", "positions")
    stacked = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in keys}
    logps, mask = response_logprobs(model, stacked, last=last, logprob_chunk=logprob_chunk)
    seq, length = sequence_logprob(logps, mask), mask.sum(-1)
    b = batch["chosen_tokens"].shape[0]
    return seq[:b], seq[b:], length[:b], length[b:]


def make_dpo_loss_fn(cfg: DPOConfig, *, logprob_chunk: int | None = None):
    """`loss_fn(policy, batch, rng, *, last=None)` for `make_train_step`; returns (sum, count) over pairs.

    batch: the `chosen_*` / `rejected_*` arrays of `jaxalign.data`, plus
    `ref_chosen_logps`, `ref_rejected_logps` `[B]` when the loss needs a reference.
    last: score only the last `last` columns, a static option of the step
    (`PairStep` passes the batcher's `score_width`).
    logprob_chunk: positions per chunk of the LM head and softmax
    (`jaxalign.models.logprobs.head_logprobs`; None: automatic, 0: all at once).
    """

    def loss_fn(policy, batch, rng, *, last: int | None = None):
        del rng
        pc, pr, lc, lr = pair_logprobs(policy, batch, last=last, logprob_chunk=logprob_chunk)
        chosen_nll = -pc / jnp.maximum(lc, 1.0)
        if cfg.loss_type == "simpo":
            return simpo_loss(pc, pr, lc, lr, beta=cfg.beta, gamma=cfg.simpo_gamma, return_parts=True)
        if cfg.loss_type == "orpo":
            return orpo_loss(pc, pr, lc, lr, chosen_nll, lam=cfg.orpo_lambda, return_parts=True)
        return dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=cfg.beta,
                        loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                        chosen_nll=chosen_nll, rpo_alpha=cfg.rpo_alpha, return_parts=True)

    return loss_fn


def make_reference_fn(reference, *, logprob_chunk: int | None = None):
    """A jitted `batch -> (ref_chosen_logps, ref_rejected_logps)` for a frozen reference model
    (`logprob_chunk`: see `make_dpo_loss_fn`)."""
    from flax import nnx

    graphdef, state = nnx.split(reference)

    @functools.partial(jax.jit, static_argnames="last")
    def ref(state, batch, last=None):
        pc, pr, _, _ = pair_logprobs(nnx.merge(graphdef, state), batch, last=last, logprob_chunk=logprob_chunk)
        return pc, pr

    keys = ("tokens", "loss_mask", "attention_mask", "positions")

    def ref_fn(batch):
        arrays, opts = pair_options(batch)
        return ref(state, {f"{s}_{k}": arrays[f"{s}_{k}"] for s in ("chosen", "rejected") for k in keys}, **opts)

    return ref_fn


def precompute_reference(ref_fn, pairs, *, batch_size: int) -> dict[int, tuple[float, float]]:
    """Reference log-probs of every pair of `pairs` (`PreferenceData`), keyed by its source index.

    Every pair is covered: the last batch wraps around to keep one shape.
    """
    from jaxalign.data import collate_preference

    n = len(pairs)
    length = int(pairs.lengths().max())
    table = {}
    for lo in range(0, n, batch_size):
        rows = [(lo + k) % n for k in range(batch_size)]
        batch = collate_preference([pairs.chosen[i] for i in rows], [pairs.rejected[i] for i in rows],
                                   pairs.prompt_lengths[rows], length=length, pad_id=pairs.pad_id)
        batch["index"] = pairs.index[rows]
        c, r = (np.asarray(x) for x in ref_fn(batch))
        for i, ci, ri in zip(np.asarray(batch["index"]).tolist(), c, r):
            table[i] = (float(ci), float(ri))
    return table


def attach_reference(batch: dict, *, ref_fn=None, table=None) -> dict:
    """The batch with `ref_chosen_logps`, `ref_rejected_logps` from a live reference or a table."""
    if table is not None:
        rows = np.array([table[i] for i in np.asarray(batch["index"]).tolist()], np.float32)
        c, r = rows[:, 0], rows[:, 1]
    else:
        c, r = ref_fn(batch)
    return {**batch, "ref_chosen_logps": c, "ref_rejected_logps": r}


def with_base_reference(loss_fn, **pair_kw):
    """`loss_fn` with its reference log-probs computed in the step from the policy's own base:
    a LoRA policy with its adapters off (`jaxalign.models.lora.adapters_off`), no second copy of
    the weights. `pair_kw`: keywords of `pair_logprobs` (e.g. `logprob_chunk`)."""
    from jaxalign.models.lora import adapters_off

    def wrapped(policy, batch, rng, *, last: int | None = None):
        with adapters_off(policy):
            rc, rr, _, _ = pair_logprobs(policy, batch, last=last, **pair_kw)
        batch = {**batch, "ref_chosen_logps": jax.lax.stop_gradient(rc),
                 "ref_rejected_logps": jax.lax.stop_gradient(rr)}
        return loss_fn(policy, batch, rng, last=last)

    return wrapped
