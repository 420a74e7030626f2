"""One PNG of a `make bench` run: where jaxalign stands against the peers, and how its steps scale.

    python -m benchmarks.plot                         # results/bench.json -> results/bench.png
    python -m benchmarks.plot RUN.json --out RUN.png

`make bench` writes it too. Four panels:
  1. speed ratio vs each peer per workload (peer time / jaxalign time, tokens/s the other way),
     beside the FLOPs ratio (peer FLOPs / jaxalign FLOPs: the part of the lead that is less work),
  2. peak-RSS ratio vs each peer, rerun (cache warm) and first run (compiling),
  3. time from launch to the end of the first step, cold and with a warm compilation cache, per
     framework on the SmolLM2 rows; with `--extras` rows, the SmolLM2 DPO step's time against
     tokens per step instead, along sequence length and along batch,
  4. every framework's model-FLOPs utilisation on the SmolLM2 rows.
Ratios are drawn on a log axis, so 2x ahead and 2x behind sit the same distance from 1x.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workloads  # noqa: E402

from benchmarks.bench import SCALING, ratio  # noqa: E402


def dpo_scaling(rows: list[dict], model: str = "smollm2") -> dict[str, list[tuple[int, float]]]:
    """{"length": [(tokens per step, step time)], "batch": [...]} from the DPO scaling rows, sorted.

    Tokens per step = pairs * 2 sequences * (prompt + completion) tokens; the base
    `dpo_step` point belongs to both series.
    """
    base = workloads.WORKLOADS[model]["dpo_step"]
    times = {r["workload"]: r["value"] for r in rows
             if r["framework"] == "jaxalign" and r["metric"] == "step_time"}
    series = {"length": [], "batch": []}
    for name, override in {"dpo_step": {}, **SCALING}.items():
        if name.split("@")[0] != "dpo_step":
            continue
        t = times.get(f"{name}/{model}")
        if t is None or not math.isfinite(t):
            continue
        s = {**base, **override}
        point = (s["pairs"] * 2 * (s["prompt_len"] + s["completion_len"]), t)
        if "pairs" not in override:
            series["length"].append(point)
        if "prompt_len" not in override:
            series["batch"].append(point)
    return {k: sorted(v) for k, v in series.items()}


def _label(workload: str) -> str:
    name, _, model = workload.partition("/")
    return f"{name.replace('_step', '').replace('_g', ' G').replace('grpo', 'GRPO').replace('dpo', 'DPO')}, {model}"


def grouped_bars(ax, rows: list[dict], metrics: tuple[str, ...], labels: tuple[str, ...], title: str) -> None:
    """Horizontal bars of `metrics` per SmolLM2 workload, one colour per framework (light: later metrics)."""
    colors = {"jaxalign": "tab:blue", "trl": "tab:orange", "tunix": "tab:green"}
    pick = [r for r in rows if r["metric"] in metrics and r["workload"].endswith("/smollm2")
            and math.isfinite(r["value"])]
    workloads_ = list(dict.fromkeys(r["workload"] for r in pick))
    fws = [f for f in colors if any(r["framework"] == f for r in pick)]
    bars = [(f, m, lab) for f in fws for m, lab in zip(metrics, labels)]
    height = 0.8 / max(len(bars), 1)
    index = {(r["workload"], r["framework"], r["metric"]): r["value"] for r in pick}
    for i, (f, m, lab) in enumerate(bars):
        ys = [j + (i - (len(bars) - 1) / 2) * height for j, w in enumerate(workloads_) if (w, f, m) in index]
        xs = [index[(w, f, m)] for w in workloads_ if (w, f, m) in index]
        ax.barh(ys, xs, height=height, color=colors[f], alpha=1.0 if m == metrics[0] else 0.45,
                label=f"{f} {lab}".strip())
        for y, x in zip(ys, xs):
            ax.text(x, y, f" {x:.3g}", va="center", fontsize=6)
    if not pick:
        ax.text(0.5, 0.5, "no SmolLM2 rows in this run", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    ax.set_yticks(range(len(workloads_)), [_label(w) for w in workloads_], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    if pick:
        ax.legend(fontsize=7)


def plot(rows: list[dict], path: str | Path) -> Path:
    """Draw the four panels of a bench run's rows into `path` (PNG); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    peers = sorted({r["framework"] for r in rows} - {"jaxalign", "matmul-ceiling"})
    compared = [w for w in dict.fromkeys(r["workload"] for r in rows if r["framework"] in peers)]
    fig = Figure(figsize=(13, 10), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = {"trl": "tab:orange", "tunix": "tab:green"}

    def note(ax, why: str):
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")

    def empty(ax, title: str, why: str):
        ax.set_title(title)
        note(ax, why)
        ax.set_xticks([])
        ax.set_yticks([])

    def ratio_bars(ax, metrics: dict[str, str], title: str):
        if not peers:
            return empty(ax, title, "no peer in this run")
        labels = [_label(w) for w in compared]
        bars = [(p, m, mlabel) for p in peers for m, mlabel in metrics.items()]
        height = 0.8 / max(len(bars), 1)
        for i, (p, m, mlabel) in enumerate(bars):
            ys, xs = [], []
            for j, w in enumerate(compared):
                key = m if m != "speed" else ("tokens_per_s" if w.startswith("sample") else "step_time")
                v = ratio(rows, w, key, p)
                if v is not None:
                    ys.append(j + (i - (len(bars) - 1) / 2) * height)
                    xs.append(v)
            # Bars grow from 1x: right when jaxalign is ahead, left when it is behind.
            ax.barh(ys, [x - 1.0 for x in xs], height=height, left=1.0, color=colors.get(p),
                    alpha=1.0 if i % len(metrics) == 0 else 0.45, label=f"vs {p}" + (f" ({mlabel})" if mlabel else ""))
            for y, x in zip(ys, xs):
                ax.text(x, y, f" {x:.2f}×" if x >= 1 else f"{x:.2f}× ", va="center", ha="left" if x >= 1 else "right",
                        fontsize=6.5)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, 0.7), hi * 1.25)
        ticks = [t for t in (0.5, 0.7, 1, 1.5, 2, 3, 4, 6, 8) if min(lo, 0.7) <= t <= hi * 1.25]
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(compared)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("ratio, > 1 = jaxalign ahead (log)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(bars))

    ratio_bars(axes[0, 0], {"speed": "speed", "model_flops": "FLOPs"},
               "speed: peer time / jaxalign time (tokens/s: jaxalign / peer);\nFLOPs: peer / jaxalign")
    ratio_bars(axes[0, 1], {"peak_rss": "rerun", "peak_rss_first_run": "first run"},
               "peak RSS: peer / jaxalign")

    ax = axes[1, 0]
    series = dpo_scaling(rows)
    if not any(len(v) > 1 for v in series.values()):
        grouped_bars(ax, rows, ("time_to_first_step_cold", "time_to_first_step_warm"), ("cold", "warm cache"),
                     "launch to the end of the first step, SmolLM2-135M (s)")
    else:
        for name, marker in (("length", "o"), ("batch", "s")):
            pts = series[name]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label=f"along {name}")
        base = [p for p in series["length"] if p in series["batch"]]
        if base:
            xs = sorted({x for pts in series.values() for x, _ in pts})
            ax.plot(xs, [base[0][1] * x / base[0][0] for x in xs], ls="--", color="gray", label="∝ tokens")
        ax.set_xlabel("tokens per step (policy; pairs × 2 × length)")
        ax.set_ylabel("step time (s)")
        ax.set_title("DPO step, SmolLM2-135M: time against tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    grouped_bars(axes[1, 1], rows, ("mfu",), ("",), "MFU, SmolLM2-135M (% of the run's best f32 GEMM rate)")

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="?", default=str(ROOT / "results" / "bench.json"))
    ap.add_argument("--out", default=None, help="PNG path (default: beside the rows, .png)")
    args = ap.parse_args(argv)
    out = args.out or str(Path(args.rows).with_suffix(".png"))
    data = json.loads(Path(args.rows).read_text())
    print(f"[plot] wrote {plot(data['rows'] if isinstance(data, dict) else data, out)}")


if __name__ == "__main__":
    main()
