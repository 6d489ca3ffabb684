"""Reports of results: a markdown table and Rel/Gen/Loc curves against the number of edits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .scoring import locality_kinds


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_table(results: Sequence[dict]) -> str:
    """A markdown table of several results dicts (one row per method)."""
    ppl = any(r.get("protocol", {}).get("eval_metric") == "ppl" for r in results)
    kinds = locality_kinds([r.get("summary", {}) for r in results])
    loc = [f"loc:{k}" for k in kinds]
    cols = (["rel_ppl", "gen_ppl", "loc"] + loc if ppl else
            ["rel", "gen", "loc"] + loc + ["avg", "rel_em", "gen_em", "loc_em"]
            + [f"loc_em:{k}" for k in kinds])
    if not ppl and any(r.get("summary", {}).get("rel_wild") is not None for r in results):
        cols += ["rel_wild", "gen_wild", "loc_wild"]  # free generation that must stop
    head = ["method"] + cols + ["T", "chunks", "edit s", "eval s", "implementation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s, p, t = r.get("summary", {}), r.get("protocol", {}), r.get("timings", {})
        row = [r.get("method", "?")] + [_fmt(s.get(c)) for c in cols] + [
            _fmt(p.get("chunk_size")), _fmt(p.get("n_chunks")),
            _fmt(t.get("edit_s"), 1), _fmt(t.get("eval_s"), 1),
            r.get("implementation", "?")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_curves(results: Sequence[dict], path: os.PathLike, title: str = "") -> Path:
    """One PNG: Rel / Gen / Loc (or PPL) against the number of edits, a line per method;
    token accuracy solid, greedy exact match dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = any(r.get("protocol", {}).get("eval_metric") == "ppl" for r in results)
    panels = ([("rel_ppl", None, "Rel PPL (lower is better)"),
               ("loc", None, "Loc")] if ppl else
              [("rel", "rel_em", "Rel"), ("gen", "gen_em", "Gen"), ("loc", "loc_em", "Loc")])
    kinds = locality_kinds([p for r in results for p in r.get("checkpoints") or []])
    if len(kinds) > 1:  # Loc is then the mean over kinds; each kind gets its own panel
        panels[-1] = ("loc", "loc_em", "Loc (mean over kinds)")
        panels += [(f"loc:{k}", f"loc_em:{k}", f"Loc, {k.replace('_', ' ')}") for k in kinds]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, em_key, label) in zip(axes[0], panels):
        for i, r in enumerate(results):
            pts = r.get("checkpoints") or []
            xs = [p["edits"] for p in pts if p.get(key) is not None]
            ys = [p[key] for p in pts if p.get(key) is not None]
            color = colors[i % len(colors)]
            if xs:
                ax.plot(xs, ys, marker="o", color=color, label=r["method"])
            if em_key:
                xe = [p["edits"] for p in pts if p.get(em_key) is not None]
                ye = [p[em_key] for p in pts if p.get(em_key) is not None]
                if xe:
                    ax.plot(xe, ye, marker="x", linestyle="--", color=color, alpha=0.7)
        ax.set_title(label)
        ax.set_xlabel("edits so far")
        if not key.endswith("ppl"):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if not ppl:
        axes[0][-1].annotate("solid: token accuracy (EasyEdit)\ndashed: greedy exact match",
                             xy=(0.02, 0.02), xycoords="axes fraction", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
