"""The comparison `make demo` runs: SFT -> pairs -> reward model -> DPO, PPO, GRPO, Dr. GRPO, DAPO, over seeds.

    python experiments/compare.py --config experiments/configs/arithmetic.py [--config.seeds=5]
    python experiments/compare.py --config experiments/configs/arithmetic.py --config.new_presets=True
    python experiments/compare.py --config experiments/configs/ablation.py     # make ablation

Writes results/<name>.{md,json,png} and the curves, and prints the table
(mean ± 95% confidence interval over the seeds); the resolved config (every
run's algorithm with its preset filled in) goes to <workdir>/config.json.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import launch  # noqa: E402


def main(cfg) -> None:
    from experiments import comparison, comparison_report as report, wiring

    t0 = time.perf_counter()
    wiring.write_config(cfg.workdir, {**cfg.to_dict(), "runs": comparison.selected_runs(cfg)})
    rows, curves, meta = comparison.run_comparison(cfg)
    meta["wall_time_s"] = time.perf_counter() - t0
    name = cfg.get("name", "comparison")
    if name == "ablation":
        rows = [{"components": r["algorithm"], **r} for r in rows]
        table = report.ablation_table(rows)
    else:
        table = report.markdown_table(rows)
    report.write_results(rows, curves, meta, cfg.results, name=name, table=table)
    print(table + "\n\n" + report.notes(meta))
    print(f"\nwrote {cfg.results}/{name}.md, {name}.json and plots; total {meta['wall_time_s']:.0f} s")


if __name__ == "__main__":
    launch(main, "comparison config")
