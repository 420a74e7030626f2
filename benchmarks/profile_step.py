"""Where a jaxalign DPO step's time goes on XLA:CPU: wall time per op kind.

    .venv/bin/python benchmarks/profile_step.py --model smollm2 --model-dir benchmarks/.models/smollm2

Runs the `dpo_step` workload of `benchmarks/workloads.py` (the same batch as
the benchmark), times a few steps, then traces two more with
`jax.profiler` and sums the XLA:CPU thunks per op kind (the fusion name
without its number: `ynn_fusion`, `copy_bitcast_fusion`, ...). When two
thunks run at once on the two worker threads, each gets half of that
stretch, so the column adds up to the time some op was running; the rest
of the step is gaps between ops. Set `XLA_FLAGS` or `JAXALIGN_XLA_DEFAULTS=1`
to compare compiler options (docs/training.md).

Read it as a map, not a stopwatch: a dot that XLA hands to Eigen (not YNNPACK)
runs asynchronously, so its event covers only the launch and its work shows as
a gap; and two independent ops that share the two cores (the LM head's `dx` and
`dW` GEMMs, say) each look twice as slow as alone. Compare variants with paired
runs in one process (`--workload dpo_parts` of the runner for the parts of a
step).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _events(xspace_path: str) -> list[tuple[int, int, str]]:
    """(start ns, end ns, op kind) of every XLA:CPU thunk on the worker threads."""
    from jax.profiler import ProfileData

    out = []
    for plane in ProfileData.from_file(xspace_path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end:")):
                    continue
                out.append((ev.start_ns, ev.start_ns + ev.duration_ns, re.sub(r"[._]?\d+$", "", ev.name)))
    return out


def wall_by_kind(events: list[tuple[int, int, str]]) -> tuple[dict[str, float], float, float]:
    """({kind: ms}, ms covered by some op, ms from first start to last end)."""
    edges = sorted([(a, 1, k) for a, _, k in events] + [(b, -1, k) for _, b, k in events],
                   key=lambda e: (e[0], e[1]))
    running: collections.Counter = collections.Counter()
    wall: collections.Counter = collections.Counter()
    covered, last = 0.0, None
    for t, d, kind in edges:
        n = sum(running.values())
        if last is not None and n:
            for k, v in running.items():
                wall[k] += (t - last) * v / n / 1e6
            covered += (t - last) / 1e6
        running[kind] += d
        if running[kind] == 0:
            del running[kind]
        last = t
    span = (max(b for _, b, _ in events) - min(a for a, _, _ in events)) / 1e6 if events else 0.0
    return dict(wall), covered, span


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--model-dir", default=None, help="default: benchmarks/.models/MODEL")
    ap.add_argument("--steps", type=int, default=4, help="timed steps before the traced ones")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.modules.setdefault("torch", None)  # as in a jaxalign install (see runners/jaxalign_runner.py)

    import jax

    import workloads
    from benchmarks.runners.jaxalign_runner import build_dpo
    from jaxalign.algorithms import dpo

    s = workloads.spec(args.model, "dpo_step", False)
    step, state, batch, ref_fn, *_ = build_dpo(args.model_dir or str(ROOT / "benchmarks" / ".models" / args.model), s)

    def one(state):
        state, _ = step(state, dpo.attach_reference(batch, ref_fn=ref_fn))
        jax.block_until_ready(state.params)
        return state

    for _ in range(2):  # compile and warm up
        state = one(state)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state = one(state)
        times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    print(f"{args.model} DPO step: {', '.join(f'{t:.3f}' for t in times)} s (median {median:.3f} s)")

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(2):
            state = one(state)
        jax.profiler.stop_trace()
        wall, covered, span = wall_by_kind(_events(sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]))
    print(f"traced 2 steps: {span / 2:.1f} ms per step, {covered / 2:.1f} ms of it with some op running")
    print("| op kind | wall ms / step | share |\n|---|---|---|")
    for kind, ms in sorted(wall.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {kind} | {ms / 2:.1f} | {100 * ms / covered:.1f}% |")


if __name__ == "__main__":
    main()
