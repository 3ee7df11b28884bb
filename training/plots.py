"""PNG plots of a run from its metrics.jsonl: the loss curve and a training-results figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from model.errors import ClipforgeError

from .logs import read_metrics


def _series(records: list[dict[str, Any]], kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and r.get(x) is not None:
            xs.append(float(r[x]))
            ys.append(float(r[key]))
    return xs, ys


def _smooth(ys: list[float], alpha: float = 0.1) -> list[float]:
    out, avg = [], None
    for y in ys:
        if math.isnan(y):
            out.append(avg if avg is not None else y)
            continue
        avg = y if avg is None else (1 - alpha) * avg + alpha * y
        out.append(avg)
    return out


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write plots/loss.png and plots/results.png for a run folder; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ClipforgeError(f"{run_dir} has no metrics.jsonl records to plot")
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # Loss curve: training loss per logged step (raw and smoothed), val loss at each evaluation.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, ys = _series(records, "train", "loss")
    if xs:
        ax.plot(xs, ys, alpha=0.3, color="C0", label="train loss")
        ax.plot(xs, _smooth(ys), color="C0", label="train loss (smoothed)")
    vx, vy = _series(records, "val", "val_loss")
    if vx:
        ax.plot(vx, vy, "o-", color="C1", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(f"loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # Results per epoch: losses, in-batch accuracy, recall@k, zero-shot accuracy.
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        ("loss", [("train", "loss"), ("val", "val_loss")]),
        ("in-batch accuracy (val)", [("val", "val_i2t_acc"), ("val", "val_t2i_acc")]),
        ("retrieval recall (val)", [("val", f"{d}_r{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)]),
        ("zero-shot accuracy", [("val", "zeroshot_top1"), ("val", "zeroshot_top5"),
                                ("val", "val_zeroshot_top1"), ("val", "val_zeroshot_top5")]),
    ]
    for ax, (title, keys) in zip(axes.flat, panels):
        drawn = False
        for kind, key in keys:
            x, y = _series(records, kind, key, x="epoch")
            if not x:
                continue
            if kind == "train":  # per-epoch mean of the logged training loss
                by_epoch: dict[float, list[float]] = {}
                for xi, yi in zip(x, y):
                    if not math.isnan(yi):  # skip NaN losses
                        by_epoch.setdefault(xi + 1, []).append(yi)
                x = sorted(by_epoch)
                y = [sum(by_epoch[e]) / len(by_epoch[e]) for e in x]
            ax.plot(x, y, "o-", label=key)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured for this data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"training results: {run_dir.name}")
    fig.tight_layout()
    path = out_dir / "results.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
