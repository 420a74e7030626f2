"""What only PPO needs: the actor-critic pair it trains and the critic's values.

The rest of PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) is the
on-policy driver with the `ppo` preset (`advantage="gae"`, the KL in the
per-token reward). Implementation details followed (Huang et al. 2024, "The N
Implementation Details of RLHF with PPO"): value head zero-initialised;
logits divided by the sampling temperature wherever log-probs are
recomputed; the score on the last generated token, with an optional fixed
score for completions that never emit EOS (`no_eos_score`); advantages
whitened per batch; value loss clipped around the rollout's values; adaptive
KL coefficient.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxalign.models import Transformer, ValueModel, clone_model, with_value_head
from jaxalign.training import ModelDef


class ActorCritic(nnx.Module):
    """The trained pair: `actor` (a language model) and `critic` (a value model).

    shared: one backbone with two heads, else the critic is a copy of the
    actor's backbone with its own (zero-initialised) value head.
    """

    def __init__(self, actor: Transformer, *, shared: bool = False):
        if shared:
            self.actor, self.critic = actor, with_value_head(actor)
        else:
            self.actor = actor
            self.critic = with_value_head(clone_model(actor))


def values_fn(critic: ValueModel):
    """A jitted `(critic params, tokens, attention_mask) -> values [R, T-1]`, aligned with `tokens[:, 1:]`
    (V_t is the value of the prefix that generates token t + 1)."""
    model_def, _ = ModelDef.of(critic)

    @jax.jit
    def fn(params, tokens, attention_mask):
        m = model_def.merge(params)
        return m(tokens, attention_mask=attention_mask)[:, :-1]

    return fn
