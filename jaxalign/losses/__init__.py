"""Pure loss functions over arrays: `(arrays…, *, hyper-parameters) -> (loss, metrics)`.

Token-level losses reduce by a named `agg` mode and can return the
`(numerator, denominator)` pair (`return_parts=True`) for exact gradient
accumulation; see `jaxalign.losses.aggregation`. The table of losses with
formulas and papers is in docs/losses.md.
"""

from jaxalign.losses.aggregation import AGGREGATIONS, aggregate, aggregate_parts, masked_mean
from jaxalign.losses.group import (
    GROUP_SCALES,
    dapo_loss,
    dynamic_sampling_mask,
    group_advantages,
    grpo_loss,
    overlong_penalty,
)
from jaxalign.losses.kl import (
    KL_ESTIMATORS,
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
    kl_penalty,
)
from jaxalign.losses.ppo import clipped_surrogate, gae, ppo_policy_loss, ppo_value_loss, whiten
from jaxalign.losses.preference import (
    DPO_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    log_odds,
    orpo_loss,
    simpo_loss,
)
from jaxalign.losses.sft import sft_loss, token_logprobs

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSSES",
    "GROUP_SCALES",
    "KL_ESTIMATORS",
    "KLController",
    "KLControllerState",
    "adaptive_kl_controller",
    "aggregate",
    "aggregate_parts",
    "bradley_terry_loss",
    "clipped_surrogate",
    "dapo_loss",
    "dpo_loss",
    "dynamic_sampling_mask",
    "fixed_kl_controller",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "log_odds",
    "masked_mean",
    "orpo_loss",
    "overlong_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
    "simpo_loss",
    "token_logprobs",
    "whiten",
]
