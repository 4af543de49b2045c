"""A PNG bar chart of a results file's speedups: one panel per op, one group of bars per (case, mode), one bar per
provider against the op's baseline (log scale, 1x marked). Needs matplotlib (optional).

    python -m benchmarks.plot benchmarks/results/amd-epyc-2-threads.json   (writes the .png beside it)
"""
from __future__ import annotations

import json
import sys

ROLE_COLORS = {"vitops": ("#1f4e9c", "#4f86d9", "#9dbcf0"), "baseline": ("#d9822b", "#8c8c8c", "#e3b27d", "#5c5c5c"),
               "yardstick": ("#3c9a5f",), "reference": ("#c9c9c9",)}  # fmt: skip


def plot(results: dict, path: str) -> str:
    """Draws every table of `results` (the JSON `python -m benchmarks` writes) into `path`; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [t for t in results["tables"] if any("speedup" in r for r in t["rows"])]
    layouts = []
    for t in tables:
        groups = list(dict.fromkeys((r["case"], r["mode"]) for r in t["rows"]))
        bars = [p for p in dict.fromkeys(r["provider"] for r in t["rows"]) if p != t["baseline"]]
        layouts.append((t, groups, bars))
    heights = [0.9 + 0.22 * len(groups) * max(len(bars), 1) + 0.12 * len(groups) for _, groups, bars in layouts]
    fig, axes = plt.subplots(len(layouts), 1, figsize=(13, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    env = results["environment"]
    fig.suptitle(f"vitops: speedup vs each op's baseline (bigger is faster), {env['device']}, {env['date'][:10]}"
                 + (", quick" if env.get("quick") else ""), fontsize=12, fontweight="bold")  # fmt: skip
    for ax, (t, groups, bars) in zip(axes[:, 0], layouts):
        by_key = {(r["case"], r["mode"], r["provider"]): r for r in t["rows"]}
        role_seen: dict[str, int] = {}
        colors = {}
        for p in bars:
            role = t["providers"][p]["role"]
            palette = ROLE_COLORS.get(role, ("#999999",))
            colors[p] = palette[role_seen.get(role, 0) % len(palette)]
            role_seen[role] = role_seen.get(role, 0) + 1
        bar_h = 0.8 / max(len(bars), 1)
        labels = []
        for g, (case, mode) in enumerate(groups):
            labels.append(f"{case}\n{mode}" if mode not in ("eval", "step", "fold", "train") else case)
            for b, p in enumerate(bars):
                r = by_key.get((case, mode, p))
                if r is None or "speedup" not in r:
                    continue
                y = g + (b - (len(bars) - 1) / 2) * bar_h
                noisy = r["spread_ms"]["noisy"]
                ax.barh(y, r["speedup"], height=bar_h * 0.92, color=colors[p], hatch="///" if noisy else None,
                        edgecolor="white", label=p if p not in ax.get_legend_handles_labels()[1] else None)  # fmt: skip
                ax.text(r["speedup"] * 1.03, y, f"{r['speedup']:.2f}x", va="center", fontsize=7)
        ax.axvline(1.0, color="black", linewidth=1, label=f"{t['baseline']} (1x)")
        ax.set_xscale("log", base=2)
        ax.set_yticks(range(len(groups)), labels, fontsize=8)
        ax.invert_yaxis()
        speedups = [r["speedup"] for r in t["rows"] if "speedup" in r]
        ax.set_xlim(min(0.5, min(speedups) / 1.3), max(2.0, max(speedups) * 1.8))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_title(f"{t['op']}: speedup vs {t['baseline']} (the 1x line)", fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="x", alpha=0.3)
    fig.text(0.01, 0.003, "hatched: noisy timing (p20-p80 spread above 20% of the median, or most calls waited for a "
             "CPU held by another program); details in the JSON",
             fontsize=7, color="#555555")  # fmt: skip
    fig.tight_layout(rect=(0, 0.01, 1, 0.99))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        print(plot(json.load(f), sys.argv[1].removesuffix(".json") + ".png"))
