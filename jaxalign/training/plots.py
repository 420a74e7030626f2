"""PNG plots of the main training curves from the metric rows."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

MAIN_CURVES = ("loss", "lr", "grad_norm")


def save_plots(rows: Sequence[dict], out_dir: str) -> list[str]:
    """One PNG per main curve (loss, lr, grad_norm) and per `eval/*` metric.

    rows: metric rows as written by `JsonlWriter` (`{"step": k, name: value}`).
    Returns the written paths; curves with no finite points are skipped.
    """
    # The object-oriented Figure API with the Agg canvas draws without touching
    # matplotlib's global backend, so plotting never needs a display. Imported
    # here: a training process that never plots does not pay for matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    names = [k for k in MAIN_CURVES if any(k in r for r in rows)]
    names += sorted({k for r in rows for k in r if k.startswith("eval/")})
    paths = []
    for name in names:
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if not pts:
            continue
        fig = Figure(figsize=(5, 3.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths
