"""The arithmetic and tables of a `make bench` run (benchmarks/bench.py): rounds, ratios, MFU, the fair table.

Pure functions over rows `{"workload", "framework", "metric", "value", "unit"}`, so the tests
check them on hand-made rows.
"""

from __future__ import annotations

import math
import statistics

HIGHER_IS_BETTER = {"tokens_per_s", "mfu", "train_mfu", "matmul_mfu", "matmul_mfu_paired", "paired_ceiling",
                    "flop_rate"}
PRIMARY = ("step_time", "tokens_per_s")  # a row's speed
# Rows whose first round differs by design from later ones (the JAX frameworks' cache is empty in
# round 1): the first round is reported as `<metric>_cold` (`peak_rss_first_run`), the later
# rounds' median as `<metric>_warm` (`peak_rss`).
COLD_WARM = {"first_step": ("first_step_cold", "first_step_warm"),
             "time_to_first_step": ("time_to_first_step_cold", "time_to_first_step_warm"),
             "peak_rss": ("peak_rss_first_run", "peak_rss")}
PEER_NAMES = {"jaxalign": "jaxalign", "trl": "TRL", "tunix": "Tunix"}


def _ok(rows: list[dict]) -> bool:
    return not any(r["metric"] in ("error", "unsupported") for r in rows)


def aggregate_rounds(runs: list[list[dict]]) -> list[dict]:
    """One framework's rows for one workload from its rounds (runs in order, round 1 first).

    Every metric is the median over the rounds that succeeded; the speed rows (`PRIMARY`,
    `step_time_median`) also carry `rounds` (every round's value) and `low`/`high`. `COLD_WARM`
    metrics split into round 1 (cold) and the median of later rounds (warm); with one round, only
    the cold row. Where every round failed, the first failure's rows are returned.
    """
    ok = [rows for rows in runs if _ok(rows)]
    if not ok:
        return runs[0]
    out = []
    for r in ok[0]:
        values = [x["value"] for rows in ok for x in rows if x["metric"] == r["metric"]]
        metric = r["metric"]
        if metric in COLD_WARM:
            cold, warm = COLD_WARM[metric]
            if _ok(runs[0]):
                first = next(x for x in runs[0] if x["metric"] == metric)
                out.append({**first, "metric": cold, "note": "round 1 (JAX frameworks: empty compilation cache)"})
            later = [x["value"] for rows in runs[1:] if _ok(rows) for x in rows if x["metric"] == metric]
            if later:
                out.append({**r, "metric": warm, "value": statistics.median(later),
                            "note": f"median of rounds 2-{len(runs)} (JAX frameworks: compilation cache warm)"})
            continue
        row = {**r, "value": statistics.median(values)}
        if metric in PRIMARY or metric == "step_time_median":
            row.update(rounds=values, low=min(values), high=max(values),
                       loads=[next(x.get("load") for x in rows if x["metric"] == metric) for rows in ok])
            row["note"] = (r.get("note", "") + f"; median of {len(values)} rounds").lstrip("; ")
        out.append(row)
    return out


def ceiling(rows: list[dict]) -> float | None:
    """The best f32 GEMM rate measured in the run (GFLOP/s), XLA's or torch's: the machine's."""
    values = [r["value"] for r in rows if r["framework"] == "matmul-ceiling" and math.isfinite(r["value"])]
    return max(values) if values else None


def step_seconds(index: dict, workload: str, framework: str, spec: dict | None) -> float | None:
    """Seconds per step: `step_time`, or for a sampler row one call (batch x new_tokens / tokens_per_s)."""
    t = index.get((workload, framework, "step_time"))
    if t is not None:
        return t
    tps = index.get((workload, framework, "tokens_per_s"))
    if tps and spec and "batch" in spec:
        return spec["batch"] * spec["new_tokens"] / tps
    return None


def add_mfu(rows: list[dict], specs: dict | None = None) -> list[dict]:
    """`mfu` (model FLOPs / step time / the run's `ceiling`) and `flop_rate` (GFLOP/s) for every framework
    with `model_flops`; jaxalign's `train_mfu` (train FLOPs over step time less generation) and
    `matmul_mfu` (the parts workloads). `specs`: workload name -> spec, for the sampler rows."""
    top = ceiling(rows)
    if not top:
        return rows
    out = list(rows)
    index = {(r["workload"], r["framework"], r["metric"]): r["value"] for r in rows}
    for (w, fw, metric), flops in list(index.items()):
        if metric == "matmul_flops" and index.get((w, fw, "matmul_time")):
            out.append({"workload": w, "framework": fw, "metric": "matmul_mfu", "unit": "%",
                        "value": 100.0 * flops / index[(w, fw, "matmul_time")] / (top * 1e9)})
        elif metric == "model_flops":
            step = step_seconds(index, w, fw, (specs or {}).get(w))
            if step and math.isfinite(step):
                out.append({"workload": w, "framework": fw, "metric": "flop_rate", "unit": "GFLOP/s",
                            "value": flops / step / 1e9})
                out.append({"workload": w, "framework": fw, "metric": "mfu", "unit": "%",
                            "value": 100.0 * flops / step / (top * 1e9)})
        elif metric == "train_flops" and fw == "jaxalign":
            step, gen = index.get((w, fw, "step_time")), index.get((w, fw, "generation_time"))
            if step is not None and gen is not None and step > gen:
                out.append({"workload": w, "framework": fw, "metric": "train_mfu", "unit": "%",
                            "value": 100.0 * flops / (step - gen) / (top * 1e9)})
    return out


def ratio(rows: list[dict], workload: str, metric: str, peer: str) -> float | None:
    """jaxalign against `peer` on one row, > 1 when jaxalign is ahead; None when either is missing.

    Times, memory and FLOPs: peer / jaxalign. Throughputs (tokens/s, FLOP/s, MFU): jaxalign / peer.
    """
    index = {(r["workload"], r["framework"], r["metric"]): r["value"] for r in rows}
    mine, theirs = index.get((workload, "jaxalign", metric)), index.get((workload, peer, metric))
    if not mine or theirs is None or not all(math.isfinite(v) for v in (mine, theirs)):
        return None
    return mine / theirs if metric in HIGHER_IS_BETTER else theirs / mine


def table(rows: list[dict], frameworks: list[str], metrics: tuple[str, ...] | None = None) -> str:
    """Every (workload, metric) as one line: each framework's value and jaxalign's ratio to each peer."""
    peers = [f for f in frameworks if f != "jaxalign"]
    head = ["workload", "metric"] + frameworks + [f"jaxalign vs {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r["workload"], r["framework"], r["metric"]): r for r in rows}
    order = []
    for r in rows:
        key = (r["workload"], r["metric"])
        if r["framework"] != "matmul-ceiling" and key not in order and (metrics is None or r["metric"] in metrics):
            order.append(key)
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


def _speed_cell(r: dict | None) -> str:
    """'3.10 s (2.98–3.31)': the median round and, with several rounds, the lowest and highest."""
    if r is None or not math.isfinite(r["value"]):
        return "–"
    if r["metric"] == "tokens_per_s":
        unit, scale, digits = "tok/s", 1.0, 0
    elif r["value"] < 1:
        unit, scale, digits = "ms", 1000.0, 1
    else:
        unit, scale, digits = "s", 1.0, 2
    body = f"{r['value'] * scale:,.{digits}f} {unit}"
    if len(r.get("rounds", [])) > 1:
        body += f" ({r['low'] * scale:,.{digits}f}–{r['high'] * scale:,.{digits}f})"
    return body


def _label(workload: str) -> str:
    name, _, model = workload.partition("/")
    name = (name.replace("dpo_step", "DPO step").replace("grpo_step_g", "GRPO step G = ")
            .replace("sample", "sampler"))
    return f"{name}, {'SmolLM2-135M' if model == 'smollm2' else model}"


def fair_table(rows: list[dict], frameworks: list[str]) -> str:
    """The comparison a peer would accept, as four markdown tables: speed (median round, lowest–highest),
    work (GFLOP per step, GFLOP/s, MFU, and each ratio split into fewer FLOPs × faster per FLOP),
    time to the first step (cold, warm cache) and peak RSS."""
    index = {(r["workload"], r["framework"], r["metric"]): r for r in rows}
    compared = [w for w in dict.fromkeys(r["workload"] for r in rows)
                if any((w, f, m) in index for f in frameworks if f != "jaxalign" for m in PRIMARY)]
    peers = [f for f in frameworks if f != "jaxalign"]
    names = [PEER_NAMES.get(f, f) for f in frameworks]

    def val(w, f, m, fmt):
        r = index.get((w, f, m))
        return fmt(r["value"]) if r and math.isfinite(r["value"]) else "–"

    def triple(w, m, fmt):
        return " / ".join(val(w, f, m, fmt) for f in frameworks)

    def speed_metric(w):
        return "tokens_per_s" if any((w, f, "tokens_per_s") in index for f in frameworks) else "step_time"

    out = ["| workload | " + " | ".join(names) + " | " + " | ".join(f"vs {PEER_NAMES.get(p, p)}" for p in peers)
           + " |", "|---" * (1 + len(frameworks) + len(peers)) + "|"]
    for w in compared:
        m = speed_metric(w)
        ratios = []
        for p in peers:
            x = ratio(rows, w, m, p)
            ratios.append("–" if x is None else (f"{x:.2f}×" if x >= 1.25 else f"**{x:.2f}×**"))
        out.append(f"| {_label(w)} | " + " | ".join(_speed_cell(index.get((w, f, m))) for f in frameworks)
                   + " | " + " | ".join(ratios) + " |")
    who = " / ".join(names)
    out += ["", f"| workload | GFLOP per step ({who}) | GFLOP/s ({who}) | MFU % ({who}) | "
            + " | ".join(f"vs {PEER_NAMES.get(p, p)}: fewer FLOPs × faster per FLOP" for p in peers) + " |",
            "|---" * (4 + len(peers)) + "|"]
    for w in compared:
        cells = []
        for p in peers:
            fewer, faster = ratio(rows, w, "model_flops", p), ratio(rows, w, "flop_rate", p)
            cells.append("–" if fewer is None or faster is None else f"{fewer:.2f} × {faster:.2f}")
        out.append(f"| {_label(w)} | {triple(w, 'model_flops', lambda v: f'{v / 1e9:.3g}')} | "
                   f"{triple(w, 'flop_rate', lambda v: f'{v:.3g}')} | {triple(w, 'mfu', lambda v: f'{v:.3g}')} | "
                   + " | ".join(cells) + " |")
    out += ["", f"| workload | first step, cold ({who}) | first step, warm cache | launch to end of first step, "
            f"cold | launch to end of first step, warm cache |", "|---|---|---|---|---|"]
    for w in compared:
        out.append(f"| {_label(w)} | " + " | ".join(triple(w, m, lambda v: f"{v:.1f} s") for m in (
            "first_step_cold", "first_step_warm", "time_to_first_step_cold", "time_to_first_step_warm")) + " |")
    out += ["", f"| workload | peak RSS, MiB, rerun ({who}) | first run | "
            + " | ".join(f"rerun vs {PEER_NAMES.get(p, p)}" for p in peers) + " |", "|---" * (3 + len(peers)) + "|"]
    for w in compared:
        cells = []
        for p in peers:
            x = ratio(rows, w, "peak_rss", p)
            cells.append("–" if x is None else f"{x:.2f}×")
        out.append(f"| {_label(w)} | {triple(w, 'peak_rss', lambda v: f'{v:,.0f}')} | "
                   f"{triple(w, 'peak_rss_first_run', lambda v: f'{v:,.0f}')} | " + " | ".join(cells) + " |")
    top = ceiling(rows)
    out.append(f"\nRatios > 1× mean jaxalign is ahead; **bold**: below 1.25×. Speed: median of the rounds "
               f"(lowest–highest). MFU: model FLOPs / time / {top or float('nan'):.0f} GFLOP/s, the best f32 GEMM "
               f"rate measured in this run (XLA's or torch's). The speed ratio is the product of the two factors "
               f"of the work table.")
    return "\n".join(out)
