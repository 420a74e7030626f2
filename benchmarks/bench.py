"""jaxalign next to TRL and Tunix on the same workloads, in one run, on this machine.

    make bench                                # installs the peers' side venvs, runs everything
    python -m benchmarks.bench --quick        # one timed step each: a smoke test
    python -m benchmarks.bench --frameworks jaxalign,trl --models tiny

Each (framework, model, workload) runs in its own process (the runners in
benchmarks/runners/, the workloads and their FLOP counts in
benchmarks/workloads.py), one after the other, so no two compete for the cores
and each peak RSS is its own. Every framework is timed the same way: warm-up
steps, then N steps end to end with one synchronisation at the end. Every
workload runs `--rounds` times (default 3), the frameworks in alternating order
(jaxalign, trl, tunix, then tunix, trl, jaxalign, ...); a row reports the
median round and the spread (lowest and highest round). The peers live in side
virtualenvs (.bench-venvs/<name>, pinned by benchmarks/envs/<name>-requirements.txt;
torch==2.13.0 CPU).

The two JAX frameworks run with JAX's persistent compilation cache in a fresh
directory per bench run (one per framework, every program cached), as
jaxalign's entry scripts run by default: round 1 compiles (`*_cold` rows,
`peak_rss_first_run`), later rounds load the compiled programs (`*_warm`,
`peak_rss`). TRL compiles nothing. `--no-compile-cache` runs every round cold.

Besides time: the matmul FLOPs per step of what each framework computes
(`workloads.step_flops`), the FLOP rate and the MFU (against the best f32 GEMM
rate measured in the same run, XLA's or torch's), the first step and the time
from launch to the end of the first step (cold and warm cache), and peak RSS.
Each runner row records the load averages before and after it ran.

Prints the fair table (`report.fair_table`) and writes results/bench.json
(`{"meta": the CPU, rounds and load averages, "rows": [{"workload", "framework",
"metric", "value", "unit", ...}]}`), results/bench.md (the fair table, then every
row) and results/bench.png (benchmarks/plot.py).
`--extras` adds jaxalign-only rows: DPO step scaling with length and batch, and
the DPO and GRPO steps taken apart (`dpo_parts`, `grpo_parts_g*`).
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks.report import (add_mfu, aggregate_rounds, fair_table, merge_ceilings, ratio,  # noqa: E402,F401
                               table)

VENVS = ROOT / ".bench-venvs"
PEERS = ("trl", "tunix")
WORKLOADS = ("dpo_step", "grpo_step_g4", "grpo_step_g8", "sample")
# jaxalign-only scaling on SmolLM2 (--extras): DPO step time against sequence length and batch.
SCALING = {
    "dpo_step@L64": dict(prompt_len=32, completion_len=32),
    "dpo_step@L256": dict(prompt_len=128, completion_len=128),
    "dpo_step@B1": dict(pairs=1),
    "dpo_step@B4": dict(pairs=4),
}
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
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["JAXALIGN_COMPILE_CACHE"] = "0"
        if cache is not None and framework in JAX_FRAMEWORKS:  # the same settings for both
            env["JAX_COMPILATION_CACHE_DIR"] = str(cache / framework)
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        load = [round(x, 2) for x in os.getloadavg()]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd + ["--t0", repr(time.time())], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"[bench] {framework} {model} {workload}: timed out after {timeout} s")
            return [workloads.row(workload, model, framework, "error", float("nan"), "", note="timeout")]
        wall = time.perf_counter() - t
        if proc.returncode or not out.exists():
            tail = (proc.stderr or proc.stdout)[-1500:]
            print(f"[bench] {framework} {model} {workload}: FAILED ({wall:.0f} s)\n{tail}")
            return [workloads.row(workload, model, framework, "error", float("nan"), "", note=tail[-300:])]
        rows = json.loads(out.read_text())
    load += [round(x, 2) for x in os.getloadavg()]
    for r in rows:
        r["load"] = load  # 1/5/15-minute load averages before and after the run
    print(f"[bench] {framework:8s} {model:8s} {workload:14s} {wall:6.0f} s  load {load[0]:.1f}->{load[3]:.1f}  "
          + ", ".join(f"{r['metric']}={r['value']:.4g}" for r in rows
                      if r["metric"] in ("step_time", "tokens_per_s", "time_to_first_step", "peak_rss")), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one warmup and one timed step: a smoke test")
    ap.add_argument("--frameworks", default="jaxalign,trl,tunix")
    ap.add_argument("--models", default="smollm2,tiny", help="SmolLM2 first: the rows that matter")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--extras", action="store_true",
                    help="also the jaxalign-only SmolLM2 rows: DPO scaling, dpo_parts, grpo_parts_g4/g8")
    ap.add_argument("--no-install", action="store_true", help="skip peers whose venv is missing")
    ap.add_argument("--threads", type=int, default=None, help="pin every process to the first N cores")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each (framework, workload), the frameworks in alternating order; the median "
                         "round is reported with the lowest and highest (--quick implies 1)")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="no persistent compilation cache: every round of a JAX framework compiles")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--render", metavar="BENCH_JSON", help="rewrite bench.{md,png} (and the JSON) of a run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        fws = [f for f in ("jaxalign", "trl", "tunix") if any(r["framework"] == f for r in data["rows"])]
        return write_results(Path(args.render).parent, data["rows"], fws, data["meta"], show=True)

    from models import build_all  # benchmarks/models.py

    model_dirs = build_all(ROOT / "benchmarks" / ".models")
    frameworks = []
    for fw in args.frameworks.split(","):
        if fw == "jaxalign" or ensure_venv(fw, install=not args.no_install):
            frameworks.append(fw)
        else:
            print(f"[bench] {fw}: no venv at {VENVS / fw}, skipped")
    start, load_start = time.time(), [round(x, 2) for x in os.getloadavg()]
    cache = None if args.no_compile_cache else Path(tempfile.mkdtemp(prefix="jaxalign-bench-xla-"))

    def write(rows: list[dict], rounds: int, done: bool) -> None:
        meta = {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads,
                "quick": args.quick, "rounds": rounds, "compile_cache": cache is not None, "complete": done,
                "minutes": round((time.time() - start) / 60, 1),
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
                "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()]}
        write_results(Path(args.out), rows, frameworks, meta, show=done)

    try:
        rows, rounds = _run_all(args, frameworks, model_dirs, cache, write)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    write(rows, rounds, done=True)


DERIVED = ("mfu", "flop_rate", "train_mfu", "matmul_mfu")  # add_mfu's rows, recomputed on every write


def write_results(out: Path, rows: list[dict], frameworks: list[str], meta: dict, show: bool) -> None:
    """results/bench.{json,md,png} from the rows so far (written after every workload, so a run cut
    short leaves what it measured, `"complete": false` in its meta); `show`: print the fair table."""
    names = {tuple(r["workload"].split("/", 1)) for r in rows if "/" in r["workload"]}
    specs = {f"{w}/{m}": workloads.spec(m, w, meta["quick"]) for w, m in names
             if w in workloads.WORKLOADS.get(m, {})}
    rows = add_mfu([r for r in rows if r["metric"] not in DERIVED], specs)
    fair = fair_table(rows, frameworks)
    threads = f"every process pinned to {meta['threads']} core(s)" if meta["threads"] else "all cores"
    head = (f"CPU: {meta['cpu']} ({meta['cores']} cores, {threads}); {meta['rounds']} rounds; started "
            f"{meta['started']}, {meta['minutes']} min{'' if meta.get('complete', True) else ' so far (incomplete)'}; "
            f"load averages (1/5/15 min) {meta['load_start']} at the start, {meta['load_end']} at the end."
            + (f" Rows {meta['merged']}." if meta.get("merged") else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench.md").write_text(f"<!-- {json.dumps(meta)} -->\n{head}\n\n{fair}\n\n## Every row\n\n"
                                  + table(rows, frameworks) + "\n")
    from benchmarks.plot import plot  # imported here: plot imports this module

    plot(rows, out / "bench.png")
    if show:
        print("\n" + head + "\n\n" + fair)
        print(f"\n[bench] wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'} "
              f"({meta['minutes']} min)")


def _run_all(args, frameworks: list[str], model_dirs: dict, cache: Path | None, write) -> tuple[list[dict], int]:
    rows = matmul_ceiling(args.threads)
    rounds = 1 if args.quick else max(1, args.rounds)
    for model in args.models.split(","):
        for workload in args.workloads.split(","):
            runs = {fw: [] for fw in frameworks}
            for r in range(rounds):
                for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                    runs[fw].append(run_one(fw, model, model_dirs[model], workload, quick=args.quick,
                                            threads=args.threads, cache=cache))
                # after each round, this workload's rounds so far (a run cut short keeps them)
                write(rows + [x for fw in frameworks for x in aggregate_rounds(runs[fw])], rounds, done=False)
            for fw in frameworks:
                rows += aggregate_rounds(runs[fw])
    if args.extras and "smollm2" in args.models.split(","):
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
    """`lscpu`'s model name (what the README quotes), /proc/cpuinfo's where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
