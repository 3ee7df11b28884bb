"""The training loop's state, one small dataclass per idea, and the reasons an epoch ends."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TrainConfig
from .distributed import DistInfo, all_reduce_max, all_reduce_sum
from .run_data import RunData, steps_per_epoch


class EpochEnd(enum.Enum):
    """Why an epoch of the loop stopped."""

    COMPLETE = "complete"  # every batch of an epoch of known length is trained
    EXHAUSTED = "exhausted"  # the loader ran dry: the end of a stream, or a resumed epoch with nothing left
    STEP_BUDGET = "steps"  # total_steps reached
    TIME_BUDGET = "time"  # max_minutes reached on the shared clock

    @property
    def ends_run(self) -> bool:
        return self in (EpochEnd.STEP_BUDGET, EpochEnd.TIME_BUDGET)


@dataclass(frozen=True)
class Schedule:
    """How long the run is: optimiser steps per epoch (None for a stream of unknown length) and in all."""

    steps_per_epoch: int | None
    total_steps: int

    @classmethod
    def for_run(cls, cfg: TrainConfig, run: RunData) -> Schedule:
        per_epoch = steps_per_epoch(run, cfg)
        total = cfg.epochs * per_epoch if per_epoch is not None else cfg.max_steps
        return cls(per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total)


@dataclass
class RunPosition:
    """Where the run stands in its data: what a resumed run continues from."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def advance(self) -> None:
        self.step += 1
        self.batch_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0


@dataclass
class RunClock:
    """Training wall time of the run, including the parts before a resume, and the time budget.

    The budget reads `shared`, the slowest rank's elapsed time as of the last step, so every
    rank stops at the same step and follows the same learning-rate schedule.
    """

    budget_s: float | None
    before_resume_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    shared: float = 0.0

    def elapsed(self) -> float:
        return self.before_resume_s + time.monotonic() - self.started

    def start(self) -> None:
        self.started = time.monotonic()
        self.shared = self.before_resume_s

    def sync(self, info: DistInfo, device: torch.device) -> None:
        """Read the shared clock (a collective when there is a budget: every rank calls it each step)."""
        if self.budget_s is not None:
            self.shared = all_reduce_max(self.elapsed(), info, device)

    def budget_fraction(self) -> float | None:
        """Elapsed share of the time budget, which the learning-rate schedule follows too."""
        return self.shared / self.budget_s if self.budget_s else None

    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.shared >= self.budget_s


@dataclass
class ThroughputWindow:
    """Samples and steps since the last training log record: the rates that record reports."""

    started: float = field(default_factory=time.monotonic)
    samples: int = 0
    steps: int = 0

    def add(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def seconds(self) -> float:
        return max(1e-9, time.monotonic() - self.started)


@dataclass
class BadImageBudget:
    """Unreadable training images against max_bad_fraction.

    `bad` and `seen` are this rank's counts; rank 0's start from a resumed run's totals, so
    the run's totals are counted once. `totals` is all ranks together as of the last sync:
    what the trainer state saves.
    """

    max_fraction: float
    bad: int = 0
    seen: int = 0
    totals: tuple[int, int] = (0, 0)

    def count(self, batch: dict[str, Any]) -> None:
        self.bad += batch["n_bad"]
        self.seen += batch["n_bad"] + len(batch["captions"])

    def sync(self, info: DistInfo, device: torch.device) -> tuple[int, int]:
        """(bad, seen) over all ranks (a collective: every rank calls it)."""
        bad, seen = all_reduce_sum([float(self.bad), float(self.seen)], info, device)
        self.totals = (int(bad), int(seen))
        return self.totals

    def check(self, info: DistInfo, device: torch.device) -> tuple[int, int]:
        """(bad, seen) over all ranks; raises DataError above max_fraction."""
        from training.data import check_bad_fraction

        check_bad_fraction(*self.sync(info, device), self.max_fraction)
        return self.totals


@dataclass
class BestMetric:
    """The validation metric that picks the best checkpoint, whether higher or lower is better, and its best."""

    name: str | None
    mode: str  # "max" or "min"
    value: float | None = None

    @classmethod
    def for_run(cls, cfg: TrainConfig, run: RunData) -> BestMetric:
        """cfg.best_metric, or for "auto": zero-shot top-1 on labelled data, else mean recall, else none."""
        if cfg.best_metric != "auto":
            return cls(cfg.best_metric, "min" if "loss" in cfg.best_metric else "max")
        if run.zeroshot is not None or (run.val is not None and run.val.class_names):
            return cls("zeroshot_top1", "max")
        if run.val is not None:
            return cls("recall_mean", "max")
        return cls(None, "max")

    def improves(self, metrics: dict[str, Any]) -> bool:
        if self.name is None or self.name not in metrics:
            return False
        value = float(metrics[self.name])
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value
