"""experiments/comparison.py: runs as config sections, seeds aggregated with confidence intervals, the ablation."""

import dataclasses
import math

import numpy as np
import pytest

from experiments import comparison, comparison_report, wiring
from experiments.configs import ablation, arithmetic
from jaxalign.algorithms import onpolicy


def test_mean_ci_is_students_t_interval():
    mean, ci = comparison.mean_ci([0.70, 0.74, 0.78])
    # t_{0.975, 2} = 4.302652729911275 (tables); s = 0.04; half-width = t * s / sqrt(3).
    half = 4.302652729911275 * 0.04 / math.sqrt(3)
    assert mean == pytest.approx(0.74, abs=1e-12)
    np.testing.assert_allclose(ci, [0.74 - half, 0.74 + half], rtol=1e-9)
    assert comparison.mean_ci([0.5]) == (0.5, None)


def test_aggregate_writes_the_row_schema():
    def row(acc, kl):
        return {"algorithm": "GRPO", "models_resident": "policy", "params_resident": 10, "peak_bytes": 100,
                "step_time_s": 0.1, "accuracy_before": 0.5, "accuracy_after": acc, "kl_to_ref": kl}

    rows = comparison.aggregate([[row(0.6, 0.1)], [row(0.8, 0.3)]], seeds=[1, 2])
    (r,) = rows
    assert r["seeds"] == [1, 2] and r["per_seed"]["accuracy_after"] == [0.6, 0.8]
    assert r["accuracy_after"] == pytest.approx(0.7)
    half = 12.706204736174698 * np.std([0.6, 0.8], ddof=1) / math.sqrt(2)  # t_{0.975, 1}
    np.testing.assert_allclose(r["accuracy_after_ci"], [0.7 - half, 0.7 + half], rtol=1e-9)
    assert r["peak_bytes_ci"] == [100.0, 100.0]
    assert "± " in comparison_report.markdown_table(rows)


def test_every_run_field_is_reachable_and_checked():
    cfg = arithmetic.get_config()
    runs = comparison.selected_runs(cfg)
    assert [r.label for r in runs.values()] == ["DPO", "DPO + NLL (RPO)", "PPO (reward model)", "PPO (verifier)",
                                                "GRPO", "Dr. GRPO", "DAPO"]
    assert runs["dapo"].algorithm == dataclasses.replace(onpolicy.preset("dapo"), group_size=8)
    assert runs["rpo"].algorithm.rpo_alpha == 1.0 and runs["ppo_rm"].reward == "reward_model"
    with cfg.unlocked():
        cfg.new_presets = True
        cfg.runs.dapo.algorithm.clip_eps_high = 0.3
    runs = comparison.selected_runs(cfg)
    assert list(runs)[-4:] == ["gspo", "cispo", "rloo", "reinforce_pp"]
    assert runs["dapo"].algorithm.clip_eps_high == 0.3 and runs["gspo"].algorithm.policy_loss == "gspo"
    with cfg.unlocked():
        cfg.runs.dapo.algorithm.clip_eps = 0.3
    with pytest.raises(wiring.ConfigError, match=r"^config\.runs\.dapo\.algorithm: unknown key 'clip_eps'"):
        comparison.selected_runs(cfg)


def test_ablation_adds_one_dapo_component_per_row():
    runs = list(comparison.selected_runs(ablation.get_config()).values())
    algos = [r.algorithm for r in runs]
    changed = [{f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}
               for a, b in zip(algos, algos[1:])]
    assert changed == [{"clip_eps_high"}, {"agg"}, {"overlong_filter", "overlong_cache"}, {"dynamic_sampling"}]
    assert algos[0].beta == 0 and algos[0].agg == "seq-mean-token-mean" and not algos[0].dynamic_sampling
    # The last row is the dapo preset, plus a one-token soft overlong punishment.
    assert algos[-1] == dataclasses.replace(onpolicy.preset("dapo"), group_size=8, overlong_cache=1)
