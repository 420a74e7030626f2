"""The comparison `make demo` runs: SFT -> pairs -> reward model -> DPO, PPO, GRPO, Dr. GRPO, DAPO.

    python experiments/compare.py --config experiments/configs/arithmetic.py [--config.budget.steps=30]

Writes results/comparison.{md,json} and results/*.png, and prints the table.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402



def main(argv):
    del argv
    cfg = flags.FLAGS.config
    from jaxalign import comparison as pipeline

    t0 = time.perf_counter()
    rows, curves = pipeline.run_comparison(cfg)
    pipeline.write_results(rows, curves, cfg.results)
    print(pipeline.markdown_table(rows))
    print(f"\nwrote {cfg.results}/comparison.md, comparison.json and plots; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    # Defined here, not at import: the scripts import each other's helpers.
    config_flags.DEFINE_config_file("config", None, "comparison config", lock_config=True)
    flags.mark_flags_as_required(["config"])
    app.run(main)
