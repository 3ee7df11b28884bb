"""Hyperparameter search with Optuna: each trial is a short training run, pruned on the val metric.

The study lives in SQLite inside the tune folder, so rerunning with the same --study
name continues it. Outputs: best_params.json, optimization_history.png,
param_importances.png, and each trial's own run folder.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from model.errors import ClipforgeError, ConfigError

from .config import TrainConfig, build_config
from .loop import train


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched by `clipforge tune` (a TOML file given with --space may narrow them)."""

    lr: tuple[float, float] = (1e-4, 3e-3)
    init_temperature: tuple[float, float] = (0.02, 0.1)
    weight_decay: tuple[float, float] = (1e-3, 0.3)
    batch_size: tuple[int, ...] = (32, 64, 128, 256)
    width: tuple[int, ...] = (64, 128, 192, 256)
    head_dim: int = 32
    img_layers: tuple[int, int] = (2, 6)
    text_layers: tuple[int, int] = (2, 6)
    dropout: tuple[float, float] = (0.0, 0.2)

    @classmethod
    def from_toml(cls, path: str | Path) -> SearchSpace:
        from .config import read_toml

        data = read_toml(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown search-space key(s) in {path}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
        except TypeError as exc:
            raise ConfigError(f"bad search space in {path}: {exc}") from None


def suggest(trial: Any, base: TrainConfig, space: SearchSpace, n_train: int | None = None) -> dict[str, Any]:
    """One point of the search space: optimiser, temperature, batch, and model size/regularisation."""
    batch_choices = [b for b in space.batch_size if n_train is None or b <= n_train] or [min(space.batch_size)]
    width = trial.suggest_categorical("width", list(space.width))
    heads = max(1, width // space.head_dim)
    dropout = trial.suggest_float("dropout", *space.dropout)
    model = {
        **base.model,
        "img_dim": width, "img_n_heads": heads, "text_dim": width, "text_n_heads": heads, "text_n_kv_heads": heads,
        "align_dim": width,
        "img_n_layers": trial.suggest_int("img_layers", *space.img_layers),
        "text_n_layers": trial.suggest_int("text_layers", *space.text_layers),
        "img_dropout_rate": dropout, "text_dropout_rate": dropout,
        "init_temperature": trial.suggest_float("init_temperature", *space.init_temperature, log=True),
    }
    return {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "batch_size": trial.suggest_categorical("batch_size", batch_choices),
        "model": model,
    }


def run_study(
    base: TrainConfig, out: str | Path, *, study_name: str = "clipforge", n_trials: int = 10, metric: str = "auto",
    timeout_s: float | None = None, space: SearchSpace | None = None,
) -> dict[str, Any]:
    """Run (or continue) a study; returns {"best_params", "best_value", "metric", ...} also written as JSON."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space or SearchSpace()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    chosen: dict[str, str] = {}

    def objective(trial: optuna.Trial) -> float:
        overrides = suggest(trial, base, space, n_train=base.max_samples)
        values = {**base.model_dump(), **overrides, "out": str(out / "trials" / f"trial-{trial.number:04d}"),
                  "progress": False, "tensorboard": False, "best_metric": metric}
        cfg = build_config(values)
        state: dict[str, Any] = {}

        def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
            name = _metric_name(metric, metrics)
            chosen.setdefault("name", name)
            value = float(metrics.get(name, float("nan")))
            state["value"] = value
            if math.isfinite(value):
                trial.report(_objective_value(name, value), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        train(cfg, on_epoch_end=on_epoch)
        value = state.get("value", float("nan"))
        if not math.isfinite(value):
            raise optuna.TrialPruned()  # diverged: nothing to compare
        return _objective_value(chosen["name"], value)

    study = optuna.create_study(
        study_name=study_name, storage=storage, load_if_exists=True, direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        sampler=optuna.samplers.TPESampler(seed=base.seed),
    )
    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, catch=(ClipforgeError,))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ClipforgeError(f"no trial of study {study_name!r} completed (all pruned or failed); see {out}/trials")
    name = chosen.get("name") or metric
    result = {
        "study": study_name, "metric": name, "direction": "maximize",
        "best_value": study.best_value if "loss" not in name else -study.best_value,
        "best_params": study.best_params, "best_trial": study.best_trial.number,
        "n_trials": len(study.trials), "n_complete": len(done),
        "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
    }
    (out / "best_params.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _plots(study, out)
    return result


def _metric_name(metric: str, metrics: dict[str, Any]) -> str:
    if metric != "auto":
        return metric
    for name in ("zeroshot_top1", "recall_mean", "val_loss"):
        if name in metrics:
            return name
    raise ClipforgeError("no validation metric to optimise: give val data (val_fraction > 0 or --val-data)")


def _objective_value(name: str, value: float) -> float:
    """Everything is maximised; losses are negated."""
    return -value if "loss" in name else value


def _plots(study: Any, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    logging.getLogger("optuna").setLevel(logging.ERROR)
    import warnings

    def save(ax: Any, name: str) -> None:
        ax.figure.set_size_inches(8, 5)
        ax.figure.tight_layout()
        ax.figure.savefig(out / name, dpi=100)
        plt.close(ax.figure)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        save(optuna_plots.plot_optimization_history(study), "optimization_history.png")
        try:
            ax = optuna_plots.plot_param_importances(study)
        except (RuntimeError, ValueError) as exc:  # importances need >= 2 completed trials with varied params
            _, ax = plt.subplots(figsize=(8, 5))
            ax.text(0.5, 0.5, f"parameter importances unavailable:\n{exc}", ha="center", va="center", wrap=True)
            ax.set_axis_off()
        save(ax, "param_importances.png")
