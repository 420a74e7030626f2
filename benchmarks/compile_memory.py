"""How much host memory XLA:CPU holds while it compiles, and what sets it.

    .venv/bin/python benchmarks/compile_memory.py step --model tiny
    .venv/bin/python benchmarks/compile_memory.py step --model tiny --option xla_cpu_use_fusion_emitters=false
    .venv/bin/python benchmarks/compile_memory.py kernels --n 25 50 100 200

`step` lowers the benchmark's DPO train step (`benchmarks/workloads.py`, the
step `make bench` times, with the reference log-probs attached): its
programs, the gradient and the update, or one for a model whose gradient
passes `SPLIT_MAX_GRADIENT_BYTES` (docs/training.md). For each it hands
the freed heap back to the OS, then compiles it with the options `TrainStep`
uses (plus any `--option`) while a thread samples the process's RSS every
2 ms, and prints the RSS before, the compile's peak above it, the compile
time and the number of distinct generated kernels (XLA:CPU compiles each
distinct fusion once). For a clean reading compile one program per run
(`--program gradient`), start a new process per variant, and repeat, since
the peak moves by ±30 MB between runs.

`kernels` compiles synthetic programs of N element-wise AdamW-like updates,
or N sums of squares (`--reduce`), each over a distinct shape or all over one
shape, to show the memory per distinct kernel (docs/training.md, "Memory of
a step").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import workloads  # noqa: E402


def _rss_mib() -> int:
    return int(workloads.status_mib("VmRSS") or 0)


class PeakRSS:
    """Samples RSS every `interval` s from a daemon thread; `peak` is the highest since `reset`."""

    def __init__(self, interval: float = 0.002):
        self.peak = 0
        self._interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(self._interval)

    def reset(self) -> int:
        base = _rss_mib()
        self.peak = base
        return base


def _parse_options(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option wants KEY=VALUE, got {item!r}")
        low = value.lower()
        out[key] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return out


def _compile(lowered, options, meter: PeakRSS) -> tuple[int, int, float, int]:
    """(RSS before, peak above it, seconds, distinct kernels) of one compile.

    The kernels are counted in a second compile that dumps one LLVM module per
    distinct kernel, so the dump's own memory is not in the measured peak.
    """
    from jaxalign.host import release_host_memory

    release_host_memory()
    time.sleep(0.05)
    base = meter.reset()
    start = time.perf_counter()
    lowered.compile(options)
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    grew = meter.peak - base
    with tempfile.TemporaryDirectory() as dump:
        lowered.compile({**(options or {}), "xla_dump_to": dump})
        kernels = sum(1 for name in os.listdir(dump) if name.endswith(".ir-no-opt.ll"))
    return base, grew, seconds, kernels


def step(args) -> None:
    from benchmarks.runners.jaxalign_runner import build_dpo
    from jaxalign.algorithms import dpo
    from jaxalign.algorithms.common import pair_options
    from jaxalign.host import train_step_compiler_options

    meter = PeakRSS()
    s = workloads.spec(args.model, "dpo_step", False)
    setup = build_dpo(args.model_dir or str(ROOT / "benchmarks" / ".models" / args.model), s)
    arrays, options = pair_options(dpo.attach_reference(setup.batch, ref_fn=setup.ref_fn))
    programs = setup.step.train_step.lower(setup.state, arrays, **options)
    extra = _parse_options(args.option)
    # As TrainStep compiles them: the dot fusions for the step or its gradient program, XLA's defaults
    # for a separate update program.
    dots = {**(train_step_compiler_options("cpu") or {}), **extra}
    named = dict(zip(("gradient", "update"), programs)) if len(programs) == 2 else {"step": programs[0]}
    options = {"step": dots, "gradient": dots, "update": extra or None}
    print(f"{args.model} DPO step, extra options {extra}:")
    print("| program | RSS before | compile peak | compile time | distinct kernels |\n|---|---|---|---|---|")
    for name in args.program or named:
        if name not in named:
            raise SystemExit(f"this step's programs are {list(named)}, not {name!r}")
        base, grew, seconds, kernels = _compile(named[name], options[name], meter)
        print(f"| {name} | {base} MiB | +{grew} MiB | {seconds:.1f} s | {kernels} |")


def _kernel_case(args) -> None:
    """One synthetic program compiled in this process; prints `grew seconds kernels`."""
    import jax
    import jax.numpy as jnp

    meter = PeakRSS()

    def program(xs):
        if args.reduce:
            return [jnp.sum(x * x) for x in xs]
        return [x * 0.9 + jnp.sqrt(x * x * 0.999 + 1e-8) * 0.1 - 0.01 * x for x in xs]

    # The process's first compile pays XLA's one-time set-up (~30 MB): keep it out of the row.
    jax.jit(program).lower([jax.ShapeDtypeStruct((8, 8), jnp.float32)]).compile()
    xs = [jax.ShapeDtypeStruct((64 + (i if args.distinct else 0), 32), jnp.float32) for i in range(args.n)]
    _, grew, seconds, count = _compile(jax.jit(program).lower(xs), None, meter)
    print(grew, seconds, count)


def kernels(args) -> None:
    """Each program in its own process: a compile leaves the allocator in a state that skews the next one's peak."""
    import subprocess

    kind = "sums of squares" if args.reduce else "AdamW-like updates"
    print(f"| N {kind} | shapes | compile peak | compile time | distinct kernels |\n|---|---|---|---|---|")
    for n in args.n:
        for distinct in (True, False):
            cmd = [sys.executable, __file__, "_case", "--n", str(n)] + ["--distinct"] * distinct + [
                "--reduce"] * args.reduce
            grew, seconds, count = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
            print(f"| {n} | {'distinct' if distinct else 'one'} | +{grew} MiB | {float(seconds):.1f} s | {count} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("step", help="the benchmark's DPO train step")
    p.add_argument("--model", default="tiny")
    p.add_argument("--model-dir", default=None, help="default: benchmarks/.models/MODEL")
    p.add_argument("--option", action="append", default=[], help="KEY=VALUE compiler option (repeatable)")
    p.add_argument("--program", nargs="+", choices=("step", "gradient", "update"), default=None,
                   help="the step's programs to compile, in this order (default all: step, or gradient and update)")
    p.set_defaults(fn=step)
    k = sub.add_parser("kernels", help="synthetic programs of N distinct or identical kernels")
    k.add_argument("--n", type=int, nargs="+", default=[25, 50, 100, 200])
    k.add_argument("--reduce", action="store_true", help="sums of squares instead of element-wise updates")
    k.set_defaults(fn=kernels)
    c = sub.add_parser("_case")  # one row of `kernels`, run in its own process
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--distinct", action="store_true")
    c.add_argument("--reduce", action="store_true")
    c.set_defaults(fn=_kernel_case)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAXALIGN_COMPILE_CACHE", "0")
    sys.modules.setdefault("torch", None)  # as in a jaxalign install (see runners/jaxalign_runner.py)
    args.fn(args)


if __name__ == "__main__":
    main()
