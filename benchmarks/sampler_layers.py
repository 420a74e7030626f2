"""How the compiled sampler's size and compile time grow with the decoder's depth.

    .venv/bin/python benchmarks/sampler_layers.py --model-dir benchmarks/.models/smollm2 --layers 5 15 30

For each depth L, a fresh process copies the model directory's config (no
weights) with `num_hidden_layers` set to L, builds `abstract_hf`'s model,
`Sampler.precompile`s the `sample` workload's shapes (benchmarks/workloads.py)
with no compilation cache, then drops the executable and trims the heap. It
prints one table row per depth: compile seconds, fusions in the optimized
program, anonymous memory (RssAnon) after `precompile` over before it, and how
much of that dropping the executable gives back. docs/sampling.md reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def measure(config_dir: str) -> dict:
    """In this process: precompile the sampler for the model config in `config_dir`."""
    import gc
    import time

    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
    sys.modules.setdefault("torch", None)  # as in a jaxalign install (see runners/jaxalign_runner.py)
    import jax

    import workloads
    from jaxalign.host import release_host_memory
    from jaxalign.models import abstract_hf
    from jaxalign.sampling import Sampler
    from jaxalign.sampling import decoding as sampler_module

    s = workloads.spec("smollm2", "sample", False)
    model, _ = abstract_hf(config_dir)
    sampler = Sampler(model)
    release_host_memory()
    before = _anon_mb()
    start = time.perf_counter()
    sampler.precompile(s["batch"], s["prompt_len"], max_new_tokens=s["new_tokens"], rng=jax.random.PRNGKey(0))
    seconds = time.perf_counter() - start
    release_host_memory()
    after = _anon_mb()
    (compiled,) = sampler_module._compiled.values()
    fusions = compiled.as_text().count(" fusion(")
    del compiled
    sampler_module._compiled.clear()
    gc.collect()
    release_host_memory()
    return {"compile_s": seconds, "fusions": fusions, "anon_mb": after - before,
            "executable_mb": after - _anon_mb()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / "benchmarks" / ".models" / "smollm2"))
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 15, 30])
    ap.add_argument("--child", help=argparse.SUPPRESS)  # a config dir: measure it in this process
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXALIGN_COMPILE_CACHE": "0", "JAX_ENABLE_COMPILATION_CACHE": "0"}
    print("| layers | compile | fusions | anonymous after `precompile` | of it, the executable |")
    print("|---|---|---|---|---|")
    for n in args.layers:
        with tempfile.TemporaryDirectory() as d:
            for name in os.listdir(args.model_dir):
                if name.endswith(".json"):
                    shutil.copy(os.path.join(args.model_dir, name), d)
            path = os.path.join(d, "config.json")
            with open(path) as f:
                config = json.load(f)
            config["num_hidden_layers"] = n
            with open(path, "w") as f:
                json.dump(config, f)
            out = subprocess.run([sys.executable, __file__, "--child", d], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"L={n} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {n} | {r['compile_s']:.1f} s | {r['fusions']:,} | +{r['anon_mb']:.1f} MB | {r['executable_mb']:.1f} MB |",
              flush=True)


if __name__ == "__main__":
    main()
