"""DAPO's ablation on the built-in task (`make ablation`), in the shape of DAPO's Table 1.

From the same SFT start and budget as `make demo`, each row adds one of DAPO's
components to the row above it; the last row is the `dapo` preset:

1. naive GRPO (group advantages, sequence-mean loss, clip 0.2, no KL, as DAPO drops it)
2. + clip-higher (ε_high = 0.28)
3. + token-level loss (`agg="token-mean"`)
4. + overlong filter and soft overlong punishment
5. + dynamic sampling

    python experiments/compare.py --config experiments/configs/ablation.py [--config.seeds=5]
"""

from ml_collections import ConfigDict

from experiments import comparison
from experiments.configs import arithmetic

# One soft-punishment token: an answer is at most 4 digits + EOS, so only a completion that
# runs to the 6-token budget is punished (it is also the one the filter masks).
STEPS = (
    ("naive_grpo", "Naive GRPO", dict(beta=0.0)),
    ("clip_higher", "+ clip-higher", dict(clip_eps_high=0.28)),
    ("token_loss", "+ token-level loss", dict(agg="token-mean")),
    ("overlong", "+ overlong filter and soft punishment", dict(overlong_filter=True, overlong_cache=1)),
    ("dynamic", "+ dynamic sampling (= DAPO)", dict(dynamic_sampling=True)),
)


def get_config():
    c = arithmetic.get_config()
    c.name = "ablation"
    fields, runs = {}, {}
    for key, label, change in STEPS:
        fields = {**fields, **change}
        runs[key] = comparison.onpolicy_run(label, "grpo", 2e-4, group_size=8, **fields)
    c.runs = ConfigDict(runs)
    c.algorithms = ",".join(key for key, _, _ in STEPS)
    return c
