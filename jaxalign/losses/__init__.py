"""Pure loss functions over arrays: `(arrays…, *, hyper-parameters) -> (loss, metrics)`.

Token-level losses reduce by a named `agg` mode and can return the
`(numerator, denominator)` pair (`return_parts=True`) for exact gradient
accumulation; see `jaxalign.losses.aggregation`. The table of losses with
formulas and papers is in docs/losses.md.
"""

from jaxalign.losses.advantages import reinforce_pp_advantages, rloo_advantages
from jaxalign.losses.aggregation import AGGREGATIONS, aggregate, aggregate_parts, masked_mean, safe_divide
from jaxalign.losses.group import (
    GROUP_SCALES,
    dapo_loss,
    dynamic_sampling_mask,
    group_advantages,
    grpo_loss,
    overlong_penalty,
)
from jaxalign.losses.importance import (
    IS_CORRECTIONS,
    IS_LEVELS,
    importance_correction,
    mis_mask,
    mismatch_metrics,
    tis_weights,
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
from jaxalign.losses.sequence import cispo_loss, gspo_loss
from jaxalign.losses.sft import nll_loss, sft_loss, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSSES",
    "GROUP_SCALES",
    "IS_CORRECTIONS",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    "KLController",
    "KLControllerState",
    "adaptive_kl_controller",
    "aggregate",
    "aggregate_parts",
    "bradley_terry_loss",
    "cispo_loss",
    "clipped_surrogate",
    "dapo_loss",
    "dpo_loss",
    "dynamic_sampling_mask",
    "fixed_kl_controller",
    "gae",
    "gspo_loss",
    "group_advantages",
    "grpo_loss",
    "importance_correction",
    "kl_penalty",
    "log_odds",
    "masked_mean",
    "mis_mask",
    "mismatch_metrics",
    "nll_loss",
    "orpo_loss",
    "overlong_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "safe_divide",
    "sft_loss",
    "simpo_loss",
    "tis_weights",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "whiten",
]
