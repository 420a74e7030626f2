"""jaxalign next to TRL and Tunix on the same workloads, in one run, on this machine.

    make bench                                # installs the peers' side venvs, runs everything
    python -m benchmarks.bench --quick        # one timed step each: a smoke test
    python -m benchmarks.bench --frameworks jaxalign,trl --models tiny

Each (framework, model, workload) runs in its own process (the runners in
benchmarks/runners/, the workloads in benchmarks/workloads.py), one after the
other, so no two compete for the cores and each peak RSS is its own. Every
workload runs `--rounds` times (default 2), the frameworks in alternating
order (jaxalign, trl, tunix, then tunix, trl, jaxalign), and each keeps its
fastest round: on a shared machine the speed drifts within minutes, and this
way no framework gets only the slow minutes. The
peers live in side virtualenvs (.bench-venvs/<name>, pinned by
benchmarks/envs/<name>-requirements.txt; torch==2.13.0 CPU). The matmul
ceiling is measured in the same run, and jaxalign's model-FLOPs utilisation
(MFU) is its analytic matmul FLOPs per step over step time over that ceiling.

The two JAX frameworks run with JAX's persistent compilation cache in a fresh
directory per bench run (one per framework, every program cached), as
jaxalign's entry scripts run by default: the first round compiles, later
rounds load the compiled programs. `peak_rss` is the last round's (a rerun,
cache warm), `peak_rss_first_run` the first round's (compiling); TRL compiles
nothing, so its rounds differ only by noise. `--no-compile-cache` runs every
round cold.

Prints one table with the ratios and writes results/bench.json (rows
`{"workload", "framework", "metric", "value", "unit"}`), results/bench.md and
results/bench.png (benchmarks/plot.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workloads  # noqa: E402

VENVS = ROOT / ".bench-venvs"
PEERS = ("trl", "tunix")
WORKLOADS = ("dpo_step", "grpo_step_g4", "grpo_step_g8", "sample")
# jaxalign-only scaling on SmolLM2: DPO step time against sequence length and batch; and the sampler as
# one program for the whole generation instead of its default layer loop (docs/sampling.md).
SCALING = {
    "dpo_step@L64": dict(prompt_len=32, completion_len=32),
    "dpo_step@L256": dict(prompt_len=128, completion_len=128),
    "dpo_step@B1": dict(pairs=1),
    "dpo_step@B4": dict(pairs=4),
    "sample@one_program": dict(layer_loop=False),
}
HIGHER_IS_BETTER = {"tokens_per_s", "mfu", "train_mfu", "matmul_mfu", "matmul_mfu_paired", "paired_ceiling"}
JAX_FRAMEWORKS = ("jaxalign", "tunix")


def python_of(framework: str) -> str:
    if framework == "jaxalign":
        return sys.executable
    return str(VENVS / framework / "bin" / "python")


def ensure_venv(framework: str, install: bool) -> bool:
    """Create `.bench-venvs/<framework>` from its requirements file if missing; False if unavailable."""
    py = Path(python_of(framework))
    stamp = VENVS / framework / ".installed"
    req = ROOT / "benchmarks" / "envs" / f"{framework}-requirements.txt"
    if stamp.exists() and stamp.read_text() == req.read_text():
        return True
    if not install:
        return py.exists()
    print(f"[bench] installing {framework} into {VENVS / framework} from {req.name}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENVS / framework)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    # Both files are full freezes, so nothing is resolved again (Tunix 0.1.7 declares safetensors<0.8,
    # which transformers 5.24 excludes; see docs/algorithms.md).
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-r", str(req)], check=True)
    stamp.write_text(req.read_text())
    return True


def matmul_ceiling(threads: int | None) -> list[dict]:
    """Best f32 GEMM throughput of XLA (and of torch, from the TRL venv when present), GFLOP/s."""
    code = r"""
import json, os, sys, time
n_threads = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "0" else None
if n_threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n_threads])
lib = sys.argv[2]
best = {}
for n in (512, 1024, 2048):
    if lib == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax, jax.numpy as jnp
        a = jnp.ones((n, n), jnp.float32); b = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b); f(a, b).block_until_ready()
        run = lambda: f(a, b).block_until_ready()
    else:
        import torch
        if n_threads: torch.set_num_threads(n_threads)
        a = torch.ones(n, n); b = torch.ones(n, n); a @ b
        run = lambda: a @ b
    reps = max(3, int(2e10 / (2 * n ** 3)))
    times = []
    for _ in range(reps):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    best[n] = 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e9
print(json.dumps(best))
"""
    rows = []
    for lib, fw in (("jax", "jaxalign"), ("torch", "trl")):
        py = python_of(fw)
        if not Path(py).exists():
            continue
        out = subprocess.run([py, "-c", code, str(threads or 0), lib], capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            print(f"[bench] matmul ceiling ({lib}) failed:\n{out.stderr[-2000:]}")
            continue
        best = json.loads(out.stdout.strip().splitlines()[-1])
        size, value = max(best.items(), key=lambda kv: kv[1])
        rows.append({"workload": f"matmul/{lib}", "framework": "matmul-ceiling", "metric": "gflops",
                     "value": value, "unit": "GFLOP/s", "note": f"f32 {size}x{size} GEMM; all sizes {best}"})
    return rows


def run_one(framework: str, model: str, model_dir: Path, workload: str, *, quick: bool, threads: int | None,
            override: dict | None = None, timeout: int = 1800, cache: Path | None = None) -> list[dict]:
    """One runner process; its rows. `cache`: a root for the JAX frameworks' compilation caches."""
    runner = ROOT / "benchmarks" / "runners" / f"{framework}_runner.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [python_of(framework), str(runner), "--model", model, "--model-dir", str(model_dir),
               "--workload", workload, "--out", str(out)]
        if quick:
            cmd.append("--quick")
        if threads:
            cmd += ["--threads", str(threads)]
        if override:
            cmd += ["--override", json.dumps(override)]
        t = time.perf_counter()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["JAXALIGN_COMPILE_CACHE"] = "0"
        if cache is not None and framework in JAX_FRAMEWORKS:  # the same settings for both
            env["JAX_COMPILATION_CACHE_DIR"] = str(cache / framework)
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"[bench] {framework} {model} {workload}: timed out after {timeout} s")
            return [workloads.row(workload, model, framework, "error", float("nan"), "", note="timeout")]
        wall = time.perf_counter() - t
        if proc.returncode or not out.exists():
            tail = (proc.stderr or proc.stdout)[-1500:]
            print(f"[bench] {framework} {model} {workload}: FAILED ({wall:.0f} s)\n{tail}")
            return [workloads.row(workload, model, framework, "error", float("nan"), "", note=tail[-300:])]
        rows = json.loads(out.read_text())
    print(f"[bench] {framework:8s} {model:8s} {workload:14s} {wall:6.0f} s  " + ", ".join(
        f"{r['metric']}={r['value']:.4g}" for r in rows if r["metric"] in ("step_time", "tokens_per_s", "peak_rss")),
        flush=True)
    return rows


def add_mfu(rows: list[dict]) -> list[dict]:
    """jaxalign MFU rows: model FLOPs per step / step time / the XLA matmul ceiling."""
    ceiling = next((r["value"] for r in rows if r["workload"] == "matmul/jax"), None)
    if not ceiling:
        return rows
    out = list(rows)
    index = {(r["workload"], r["framework"], r["metric"]): r["value"] for r in rows}
    for (w, fw, metric), flops in list(index.items()):
        if fw == "jaxalign" and metric == "matmul_flops" and index.get((w, fw, "matmul_time")):
            out.append({"workload": w, "framework": fw, "metric": "matmul_mfu", "unit": "%",
                        "value": 100.0 * flops / index[(w, fw, "matmul_time")] / (ceiling * 1e9)})
            continue
        if fw != "jaxalign" or metric not in ("model_flops", "train_flops"):
            continue
        step = index.get((w, fw, "step_time"))
        if metric == "train_flops":  # the training part alone: step time less generation
            gen = index.get((w, fw, "generation_time"))
            step = None if step is None or gen is None else step - gen
            name = "train_mfu"
        else:
            name = "mfu"
        if step:
            out.append({"workload": w, "framework": fw, "metric": name,
                        "value": 100.0 * flops / step / (ceiling * 1e9), "unit": "%"})
    return out


def ratio(rows: list[dict], workload: str, metric: str, peer: str) -> float | None:
    """jaxalign against `peer` on one row, > 1 when jaxalign is ahead; None when either is missing.

    Times and memory: peer / jaxalign. Throughputs (tokens/s): jaxalign / peer.
    """
    index = {(r["workload"], r["framework"], r["metric"]): r["value"] for r in rows}
    mine, theirs = index.get((workload, "jaxalign", metric)), index.get((workload, peer, metric))
    if not mine or theirs is None or not all(math.isfinite(v) for v in (mine, theirs)):
        return None
    return mine / theirs if metric in HIGHER_IS_BETTER else theirs / mine


def table(rows: list[dict], frameworks: list[str]) -> str:
    metrics = ("step_time", "tokens_per_s", "peak_rss", "peak_rss_first_run", "mfu", "train_mfu",
               "reference_time", "fwd_bwd_time", "train_step_time", "optimizer_time", "matmul_mfu",
               "paired_ceiling", "matmul_mfu_paired")
    peers = [f for f in frameworks if f != "jaxalign"]
    head = ["workload", "metric", "jaxalign"] + peers + [f"jaxalign vs {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r["workload"], r["framework"], r["metric"]): r for r in rows}
    order = []
    for r in rows:
        if r["framework"] != "matmul-ceiling" and (r["workload"], r["metric"]) not in order \
                and r["metric"] in metrics:
            order.append((r["workload"], r["metric"]))
    for w, m in order:
        vals = [index.get((w, f, m)) for f in frameworks]
        if all(v is None for v in vals):
            continue
        unit = next(v["unit"] for v in vals if v)
        cells = [w, f"{m} ({unit})"] + [f"{v['value']:.4g}" if v else "–" for v in vals]
        for p in peers:
            r = ratio(rows, w, m, p)
            cells.append("–" if r is None else f"{r:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["framework"] == "matmul-ceiling":
            lines.append(f"\nMatmul ceiling ({r['workload'].split('/')[1]}): {r['value']:.1f} GFLOP/s ({r['note']})")
    lines.append("\nRatios: > 1× means jaxalign is ahead (peer time / jaxalign time; jaxalign tokens/s / peer "
                 "tokens/s; peer RSS / jaxalign RSS).")
    return "\n".join(lines)


def merge_ceilings(rows: list[dict], again: list[dict]) -> list[dict]:
    """`rows` with each matmul-ceiling row raised to a later measurement's value where higher."""
    later = {r["workload"]: r for r in again}
    out = []
    for r in rows:
        new = later.get(r["workload"]) if r["framework"] == "matmul-ceiling" else None
        if new is not None:
            best = max((r, new), key=lambda x: x["value"])
            r = {**best, "note": best["note"] + f"; best of 2 measurements ({r['value']:.4g}, {new['value']:.4g})"}
        out.append(r)
    return out


def best_round(runs: list[list[dict]]) -> list[dict]:
    """The rows of the fastest of several runs of one (framework, workload): lowest step_time or
    highest tokens_per_s; runs that failed are passed over while another succeeded. The kept
    timing row notes every round's value, so the spread stays visible."""
    def primary(rows):
        for r in rows:
            if r["metric"] == "step_time":
                return r["value"]
            if r["metric"] == "tokens_per_s":
                return -r["value"]
        return float("inf")

    ok = [rows for rows in runs if not any(r["metric"] == "error" for r in rows)] or runs
    best = min(ok, key=primary)
    if len(runs) > 1:
        values = [abs(primary(rows)) for rows in runs]
        best = [dict(r) for r in best]
        for r in best:
            if r["metric"] in ("step_time", "tokens_per_s"):
                spread = ", ".join(f"{v:.4g}" for v in values)
                r["note"] = (r.get("note", "") + f"; best of {len(runs)} rounds ({spread})").lstrip("; ")
    return best


RERUN_METRICS = ("peak_rss", "compile_or_first_step")  # what a warm compilation cache changes


def first_and_rerun(runs: list[list[dict]], rows: list[dict]) -> list[dict]:
    """`rows` (the fastest round's) with peak RSS and first-step time taken from the last round
    (a rerun: the JAX frameworks' compilation caches warm), plus `*_first_run` rows from the first.
    One round: the rows as they are."""
    if len(runs) < 2:
        return rows
    first = {r["metric"]: r for r in runs[0]}
    last = {r["metric"]: r for r in runs[-1]}
    out = []
    for r in rows:
        if r["metric"] in RERUN_METRICS and r["metric"] in last:
            r = {**last[r["metric"]], "note": f"round {len(runs)} of {len(runs)}: a rerun"}
        out.append(r)
        if r["metric"] in RERUN_METRICS and r["metric"] in first:
            out.append({**first[r["metric"]], "metric": r["metric"] + "_first_run",
                        "note": "round 1: JAX frameworks compile (empty compilation cache)"})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one warmup and one timed step: a smoke test")
    ap.add_argument("--frameworks", default="jaxalign,trl,tunix")
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="skip peers whose venv is missing")
    ap.add_argument("--threads", type=int, default=None, help="pin every process to the first N cores")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each (framework, workload), the frameworks in alternating order; the "
                         "fastest is kept (a shared machine's speed drifts; --quick implies 1)")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="no persistent compilation cache: every round of a JAX framework compiles")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)

    from models import build_all  # benchmarks/models.py

    model_dirs = build_all(ROOT / "benchmarks" / ".models")
    frameworks = []
    for fw in args.frameworks.split(","):
        if fw == "jaxalign" or ensure_venv(fw, install=not args.no_install):
            frameworks.append(fw)
        else:
            print(f"[bench] {fw}: no venv at {VENVS / fw}, skipped")
    start = time.time()
    cache = None if args.no_compile_cache else Path(tempfile.mkdtemp(prefix="jaxalign-bench-xla-"))
    try:
        rows, rounds = _run_all(args, frameworks, model_dirs, cache)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    rows = add_mfu(rows)
    text = table(rows, frameworks)
    meta = {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads,
            "quick": args.quick, "rounds": rounds, "compile_cache": cache is not None,
            "minutes": round((time.time() - start) / 60, 1)}
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    (out / "bench.md").write_text(f"<!-- {json.dumps(meta)} -->\n" + text + "\n")
    from benchmarks.plot import plot  # imported here: plot imports this module

    plot(rows, out / "bench.png")
    print(f"\n[bench] wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'} "
          f"({meta['minutes']} min)")


def _run_all(args, frameworks: list[str], model_dirs: dict, cache: Path | None) -> tuple[list[dict], int]:
    rows = matmul_ceiling(args.threads)
    rounds = 1 if args.quick else max(1, args.rounds)
    for model in args.models.split(","):
        for workload in args.workloads.split(","):
            runs = {fw: [] for fw in frameworks}
            for r in range(rounds):
                for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                    runs[fw].append(run_one(fw, model, model_dirs[model], workload, quick=args.quick,
                                            threads=args.threads, cache=cache))
            for fw in frameworks:
                rows += first_and_rerun(runs[fw], best_round(runs[fw]))
    if not args.no_scaling and "smollm2" in args.models.split(","):
        for name, override in SCALING.items():
            rows += run_one("jaxalign", "smollm2", model_dirs["smollm2"], name, quick=args.quick,
                            threads=args.threads, override=override, cache=cache)
        # Where the DPO step's time goes: its matmul-bound part (reference forward, policy
        # forward + backward) against the rest (gradient norm, NaN guard, AdamW).
        # The same for the GRPO steps' training part, on one rollout's batch.
        for name in ("dpo_parts", "grpo_parts_g4", "grpo_parts_g8"):
            rows += run_one("jaxalign", "smollm2", model_dirs["smollm2"], name, quick=args.quick,
                            threads=args.threads, cache=cache)
    if rounds > 1:  # the ceiling again at the end; the higher of the two counts (a lower MFU)
        rows = merge_ceilings(rows, matmul_ceiling(args.threads))
    return rows, rounds


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
