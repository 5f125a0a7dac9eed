"""`parley bench --plot PATH`: one PNG of the cache benchmarks that ran (matplotlib, the "bench" extra)."""

from __future__ import annotations

from pathlib import Path

from app.errors import ParleyError

PANELS = ("ttft", "restore", "capacity", "save", "agents")


def write(results: dict, path: str | Path, title: str | None = None) -> Path | None:
    """Draw a panel for each part present in `results`; None when there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParleyError("--plot needs matplotlib: pip install 'parley[bench]' (or: pip install 'matplotlib>=3.8')") from None
    panels = [p for p in PANELS if p in results and isinstance(results[p], dict) and results[p].get("rows", results[p].get("modes"))]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        globals()[f"_{name}"](ax, results[name])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, labels, series: dict, ylabel: str, log: bool = False, annotate: bool = False):
    n = len(series)
    width = 0.8 / max(1, n)
    xs = range(len(labels))
    for i, (name, values) in enumerate(series.items()):
        pos = [x + (i - (n - 1) / 2) * width for x in xs]
        bars = ax.bar(pos, values, width, label=name)
        if annotate:
            for b, v in zip(bars, values):
                ax.annotate(f"{v:g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _ttft(ax, r):
    rows = r["rows"]
    labels = [f"{x['context_tokens']}" for x in rows]
    _bars(ax, labels, {"cold (prefill)": [x["cold_ms"] for x in rows], "warm (disk)": [x["warm_ms"] for x in rows],
                       "hot (RAM)": [x["hot_ms"] for x in rows]}, "ms (log)", log=True)
    for i, x in enumerate(rows):
        ax.annotate(f"{x['speedup_warm']}x / {x['speedup_hot']}x", (i, x["cold_ms"]), ha="center", va="bottom", fontsize=7)
    ax.set_title("time to first token (cold/warm, cold/hot)", fontsize=9)
    ax.set_xlabel("context tokens")


def _restore(ax, r):
    rows = r["rows"]
    labels = [f"{x['context_tokens']}" for x in rows]
    _bars(ax, labels, {"raw read (disk)": [x["raw_read_disk_ms"] for x in rows],
                       "restore (disk)": [x["restore_disk_ms"] for x in rows],
                       "raw read (page cache)": [x["raw_read_cached_ms"] for x in rows],
                       "restore (page cache)": [x["restore_cached_ms"] for x in rows],
                       "re-prefill": [x["reprefill_ms"] for x in rows]}, "ms (log)", log=True)
    ax.set_title("restore vs raw read vs re-prefill", fontsize=9)
    ax.set_xlabel("context tokens")


def _capacity(ax, r):
    rows = r["rows"]
    _bars(ax, [x["scheme"].split(" ")[0] for x in rows], {"idle caches": [x["fit_idle"] for x in rows]},
          "caches", annotate=True)
    ax.set_title(f"{r['context_tokens']}-token caches in {r['budget_bytes'] / 2**30:g} GiB", fontsize=9)


def _save(ax, r):
    rows = r["rows"]
    labels = [f"{x['context_tokens']}" for x in rows]
    _bars(ax, labels, {"ms per turn (median)": [x["turn_ms_median"] for x in rows],
                       "first full save ms": [x["first_save_ms"] for x in rows]}, "ms", annotate=True)
    ax.set_title("cost of saving one turn", fontsize=9)
    ax.set_xlabel("context tokens")


def _agents(ax, r):
    modes = r["modes"]
    names = list(modes)
    _bars(ax, [n.replace("persistence_all_ram", "all in RAM").replace("persistence", "persist (3 in RAM)")
               .replace("reprefill", "re-prefill") for n in names],
          {"total s": [modes[n]["total_s"] for n in names], "after round 1 s": [modes[n]["after_round1_s"] for n in names]},
          "seconds", annotate=True)
    ax.set_title(f"{len(r['personas'])} personas x {r['rounds']} rounds", fontsize=9)
