"""What the comparison writes: the markdown table (mean ± 95% CI over seeds), the JSON rows, the curves.

`comparison.json` rows: `algorithm`, `models_resident`, `params_resident`, and
for each of `accuracy_before`, `accuracy_after`, `accuracy_gain` (after − before
within a seed), `kl_to_ref`, `step_time_s`, `peak_bytes` the mean over seeds and `<column>_ci` (`[low, high]`, None for one
seed); `seeds` (the list) and `per_seed` (`{column: [value per seed]}`).
`comparison.json` is `{"rows": [...], "meta": {...}}`; the meta holds the SFT
stage, the pairs and `reward_model.heldout_pair_accuracy`.
"""

from __future__ import annotations

import json
import os


def _pm(mean, ci, fmt) -> str:
    """`mean ± half-width` of a symmetric CI, or the mean alone for one seed."""
    if mean is None:
        return "n/a"
    if ci is None:
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt((ci[1] - ci[0]) / 2).lstrip('+')}"


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _points(x) -> str:
    return f"{100 * x:+.1f}"


COLUMNS = ("algorithm", "models resident", "parameters resident", "peak step memory", "step time",
           "held-out accuracy before", "held-out accuracy after", "gain (paired)", "KL to SFT")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["algorithm"], r["models_resident"], f"{r['params_resident']:,}",
                 _pm(r["peak_bytes"], r["peak_bytes_ci"], lambda x: f"{x / 2**20:.1f} MiB"),
                 _pm(r["step_time_s"], r["step_time_s_ci"], lambda x: f"{1000 * x:.0f} ms"),
                 _pm(r["accuracy_before"], r["accuracy_before_ci"], _pct),
                 _pm(r["accuracy_after"], r["accuracy_after_ci"], _pct),
                 _pm(r["accuracy_gain"], r["accuracy_gain_ci"], _points),
                 _pm(r["kl_to_ref"], r["kl_to_ref_ci"], lambda x: f"{x:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(meta: dict) -> str:
    """One paragraph under the table: seeds, the SFT start, pairs, the reward model, the budget."""
    n = len(meta["seeds"])
    interval = "mean ± half-width of the 95% confidence interval (Student's t)" if n > 1 else "no interval"
    sft = _pm(meta["sft_accuracy"], meta["sft_accuracy_ci"], _pct)
    parts = [f"{n} seed{'s' if n > 1 else ''} ({', '.join(map(str, meta['seeds']))}); {interval}",
             f"SFT: {meta['sft_steps']} steps, held-out accuracy {sft} ({meta['sft_time_s']:.0f} s a seed)"]
    if "pairs" in meta:
        parts.append(f"{meta['pairs']:.0f} verifier-labelled pairs a seed")
    rm = meta.get("reward_model")
    if rm:
        held = rm.get("heldout_pair_accuracy")
        parts.append("reward model pair accuracy "
                     + (f"{_pct(held)} on held-out pairs" if held is not None else "n/a on held-out pairs")
                     + (f", {_pct(rm['train_accuracy_last20'])} on its last 20 training batches"
                        if "train_accuracy_last20" in rm else ""))
    parts.append(f"budget per algorithm: {meta['budget']}")
    return "; ".join(parts) + "."


def write_results(rows: list[dict], curves: dict, meta: dict, out_dir: str, name: str = "comparison",
                  table: str | None = None) -> None:
    """`<name>.md` (`table`, default `markdown_table(rows)`, and the notes), `<name>.json`,
    `<name>_curves.json` (the comparison's: `curves.json`) and `<name>.png`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"rows": rows, "meta": meta}, f, indent=1)
    curves_file = "curves.json" if name == "comparison" else f"{name}_curves.json"
    with open(os.path.join(out_dir, curves_file), "w") as f:
        json.dump(curves, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write((table or markdown_table(rows)) + "\n\n" + notes(meta) + "\n")
    plot(curves, os.path.join(out_dir, f"{name}.png"))


def plot(curves: dict, path: str) -> None:
    """Held-out accuracy (mean over seeds, 95% CI band) vs step and vs time, KL, reward, length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = [k for k in curves if k != "SFT"]
    panels = [("accuracy", "step", "held-out accuracy"), ("accuracy", "time_s", "held-out accuracy"),
              ("kl_to_sft", "step", "KL to SFT (nats / completion)"), ("reward_mean", "step", "train reward"),
              ("response_length_mean", "step", "response length (tokens)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, x, label) in zip(axes, panels):
        for i, name in enumerate(algos):  # one colour per algorithm in every panel
            pts = [p for p in curves[name] if key in p]
            if not pts:
                continue
            xs = [p[x] for p in pts]
            ax.plot(xs, [p[key] for p in pts], marker="o", ms=3, label=name, color=f"C{i}")
            cis = [p.get(f"{key}_ci") for p in pts]
            if all(cis):
                ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=f"C{i}", alpha=0.15)
        ax.set_xlabel("wall time of training (s)" if x == "time_s" else "step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ablation_table(rows: list[dict]) -> str:
    """DAPO's Table 1 in shape: each row adds one component to the one above."""
    lines = ["| model | held-out accuracy | gain over SFT (paired, points) | KL to SFT |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['components']} | {_pm(r['accuracy_after'], r['accuracy_after_ci'], _pct)} | "
                     f"{_pm(r['accuracy_gain'], r['accuracy_gain_ci'], _points)} | "
                     f"{_pm(r['kl_to_ref'], r['kl_to_ref_ci'], lambda x: f'{x:.3f}')} |")
    return "\n".join(lines)
