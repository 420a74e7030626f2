"""The comparison `make demo` runs: SFT -> pairs -> reward model -> DPO, PPO, GRPO, Dr. GRPO, DAPO.

    python experiments/compare.py --config experiments/configs/arithmetic.py [--config.budget.steps=30]

Writes results/comparison.{md,json} and results/*.png, and prints the table.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import launch  # noqa: E402


def main(cfg) -> None:
    from jaxalign import comparison as pipeline

    t0 = time.perf_counter()
    rows, curves = pipeline.run_comparison(cfg)
    pipeline.write_results(rows, curves, cfg.results)
    print(pipeline.markdown_table(rows))
    print(f"\nwrote {cfg.results}/comparison.md, comparison.json and plots; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    launch(main, "comparison config")
