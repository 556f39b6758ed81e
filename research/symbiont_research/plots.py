"""Plots the daemon's own commands offer (drawn here: matplotlib stays out of ``symbiont``)."""

from __future__ import annotations

import numpy as np

from symbiont.placement.planner import Plan


def placement_utilisation(p: Plan, path: str) -> None:
    """``symbiont placement plan --plot``: allocation / capacity per host, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(p.dims),
        1,
        figsize=(max(6.0, 0.6 * len(p.host_ids) + 2), 2.4 * len(p.dims)),
        squeeze=False,
        sharex=True,
    )
    x = np.arange(len(p.host_ids))
    for ax, d in zip(axes[:, 0], p.dims, strict=True):
        ax.bar(x - 0.2, [100 * p.utilisation_before[h][d] for h in p.host_ids], 0.4, label="before")
        ax.bar(x + 0.2, [100 * p.utilisation_after[h][d] for h in p.host_ids], 0.4, label="after")
        ax.axhline(100, color="k", lw=0.7)
        ax.set_ylabel(f"{d} (%)")
    axes[0, 0].legend()
    axes[-1, 0].set_xticks(x, p.host_ids, rotation=45, ha="right")
    fig.suptitle(f"allocation / physical capacity, {p.heuristic} ({p.mode})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
