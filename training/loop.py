"""The training loop: epochs of steps, per-epoch evaluation, checkpoints, resume, logs.

Run layout (cfg.out):
    train_config.json     the validated config
    tokenizer.json        the tokenizer a new run trained (training/build.py)
    last/                 newest checkpoint, with trainer state (what --resume reads)
    best/                 best checkpoint by cfg.best_metric (model only)
    checkpoints/step-N/   every save_every steps, with trainer state (newest keep_checkpoints kept)
    metrics.jsonl, tensorboard/, plots/
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from model import caption_groups
from model.clip import peak_flops
from model.errors import ClipforgeError, ConfigError

from .build import (
    autocast_dtype,
    build_model_and_tokenizer,
    seed_everything,
    wrap_for_training,
)
from .config import TrainConfig, load_saved_config
from .distributed import (
    all_gather_objects,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from .evaluate import evaluate, zeroshot_only
from .freeze import lock_towers
from .logs import METRICS_FILE, Progress, RunLogger, truncate_metrics
from .loop_state import (
    BadImageBudget,
    BestMetric,
    EpochEnd,
    RunClock,
    RunPosition,
    Schedule,
    ThroughputWindow,
)
from .optim import build_optimizer, lr_at, set_lr
from .run_data import make_train_loader, resolve_data
from .run_state import (
    capture_rng,
    find_resumable,
    load_trainer_state,
    optimizer_from_flat,
    prune_step_checkpoints,
    rank_rng,
    restore_rng,
    save_training_checkpoint,
)
from .step import forward_backward

EpochCallback = Callable[[int, dict[str, Any]], None]
# Settings a resumed run must share with the run it continues (the data order depends on them).
# The locks decide which parameters the saved optimiser state holds.
RESUME_INVARIANTS = ("data", "preset", "model", "batch_size", "seed", "max_samples", "val_fraction",
                     "init_checkpoint", "image_tower", "text_tower", "lock_image", "lock_text", "unlock_last")


def prepare_run_dir(out: Path, cfg: TrainConfig, *, resume: bool) -> None:
    """Check that `out` may take this run (a new folder, or the same run for --resume) and save the config."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.stage-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if resume:
        saved = load_saved_config(out)
        for key in RESUME_INVARIANTS:
            if getattr(saved, key) != getattr(cfg, key):
                raise ConfigError(
                    f"--resume: {key} differs from the run's saved config ({getattr(saved, key)!r} vs "
                    f"{getattr(cfg, key)!r}); resume with the same settings"
                )
    elif (out / "last").exists() or find_resumable(out / "last") is not None:
        raise ClipforgeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    else:  # a folder whose run never reached a checkpoint starts over
        (out / METRICS_FILE).unlink(missing_ok=True)
    cfg.save(out)


class Trainer:
    """One run, built from a TrainConfig on construction (a resumed run restores its state), trained by run()."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, on_epoch_end: EpochCallback | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.on_epoch_end = on_epoch_end
        self.info, self.device = init_distributed(cfg.device)
        if self.device.type == "cpu" and cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        if self.info.is_main:
            prepare_run_dir(self.out, cfg, resume=resume)
        barrier(self.info)
        self.data = resolve_data(cfg)
        self.schedule = Schedule.for_run(cfg, self.data)
        self.best = BestMetric.for_run(cfg, self.data)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)

        resume_dir = find_resumable(self.out / "last") if resume else None
        if resume and resume_dir is None:
            raise ClipforgeError(f"--resume: {self.out} holds no resumable checkpoint (last/ is missing)")
        built = build_model_and_tokenizer(cfg, self.data, run_dir=self.out, info=self.info, resume_from=resume_dir)
        self.model, self.tokenizer, self.origin = built.model, built.tokenizer, built.origin
        lock_towers(self.model, lock_image=cfg.lock_image, lock_text=cfg.lock_text, unlock_last=cfg.unlock_last)
        if self.info.rank > 0:  # same initial weights everywhere, but each rank its own dropout masks
            seed_everything(cfg.seed + 1_000_003 * self.info.rank)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, device=self.device,
                                         text_lr_scale=cfg.text_lr_scale, image_lr_scale=cfg.image_lr_scale)
        self.module = wrap_for_training(self.model, info=self.info, device=self.device, compile_model=cfg.compile)

        self.position = RunPosition()
        self.clock = RunClock(budget_s=cfg.max_minutes * 60 if cfg.max_minutes is not None else None)
        self.window = ThroughputWindow()
        self.bad_images = BadImageBudget(cfg.max_bad_fraction)
        self.last_metrics: dict[str, Any] = {}
        if resume_dir is not None:
            self._restore(resume_dir)
        self.logger = RunLogger(self.out, enabled=self.info.is_main, tensorboard=cfg.tensorboard)

    def _restore(self, resume_dir: Path) -> None:
        tensors, state = load_trainer_state(resume_dir)
        self.optimizer.load_state_dict(optimizer_from_flat(tensors, state["optimizer"]))
        restore_rng(*rank_rng(tensors, state, self.info.rank))
        self.position = RunPosition(int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"]))
        self.best.value = state.get("best_value")
        if self.info.is_main:  # run totals, counted once: the other ranks count only from here on
            self.bad_images.bad, self.bad_images.seen = int(state.get("n_bad", 0)), int(state.get("n_seen", 0))
        self.last_metrics = state.get("last_metrics", {})
        self.clock.before_resume_s = float(state.get("elapsed_s", 0.0))
        if self.info.is_main:
            truncate_metrics(self.out, self.position.step)

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": self.position.step, "epoch": self.position.epoch,
                                "metrics": self.last_metrics, "data": self.cfg.data,
                                "train_config": self.cfg.model_dump(), **self.origin}
        if self.data.class_names:
            meta["class_names"] = list(self.data.class_names)
            meta["templates"] = list(self.data.templates or [])
        return meta

    def _trainer_state(self) -> dict[str, Any]:
        bad, seen = self.bad_images.totals
        return {"step": self.position.step, "epoch": self.position.epoch,
                "batch_in_epoch": self.position.batch_in_epoch, "best_value": self.best.value,
                "best_metric": self.best.name, "n_bad": bad, "n_seen": seen, "last_metrics": self.last_metrics,
                "total_steps": self.schedule.total_steps, "elapsed_s": self.clock.elapsed()}

    def _save(self, name: str, with_state: bool = True) -> None:
        """Rank 0 writes; with the trainer state it is a collective (every rank sends its RNG states)."""
        peers = all_gather_objects(capture_rng(), self.info) if with_state and self.info.enabled else None
        if not self.info.is_main:
            return
        save_training_checkpoint(self.out / name, self.model, self.tokenizer, self._meta(),
                                 optimizer=self.optimizer if with_state else None, state=self._trainer_state(),
                                 peer_rng=peers)
        for stale in self.out.glob(f".{Path(name).name}.old-*"):  # left by a kill between two renames
            shutil.rmtree(stale, ignore_errors=True)

    def _save_step_checkpoint(self) -> None:
        if self.cfg.keep_checkpoints == 0:
            return
        self._save(f"checkpoints/step-{self.position.step:08d}")
        if self.info.is_main:
            prune_step_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict[str, Any]:
        """Rank 0 evaluates on the val set and the zero-shot set while the others wait."""
        metrics: dict[str, Any] = {}
        if self.info.is_main:
            if self.data.val is not None:
                val = self.data.val
                metrics.update(evaluate(
                    self.model, self.tokenizer, val.records, self.device, class_names=val.class_names,
                    templates=val.templates, loss_batch_size=self.cfg.batch_size, batch_size=self.cfg.eval_batch_size,
                    num_workers=self.cfg.num_workers, autocast_dtype=self.amp_dtype,
                ))
                metrics = {("val_" + k if k.startswith("n_") else k): v for k, v in metrics.items()}
            if self.data.zeroshot is not None:
                zeroshot = self.data.zeroshot
                if "zeroshot_top1" in metrics:
                    metrics["val_zeroshot_top1"] = metrics.pop("zeroshot_top1")
                    metrics["val_zeroshot_top5"] = metrics.pop("zeroshot_top5")
                accuracy = zeroshot_only(
                    self.model, self.tokenizer, zeroshot.records, class_names=zeroshot.class_names,
                    templates=zeroshot.templates, device=self.device, batch_size=self.cfg.eval_batch_size,
                    num_workers=self.cfg.num_workers, autocast_dtype=self.amp_dtype,
                )
                metrics["zeroshot_top1"], metrics["zeroshot_top5"] = accuracy["top1"], accuracy["top5"]
        barrier(self.info)
        return metrics

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train to the end of the schedule (or of max_minutes) and return the final metrics."""
        progress = Progress(total=self.schedule.total_steps, initial=self.position.step,
                            enabled=self.cfg.progress and self.info.is_main)
        if self.info.is_main and self.position.step == 0:
            self._log_run_start()
        self.clock.start()
        self.window = ThroughputWindow()
        while self.position.step < self.schedule.total_steps:
            end = self._run_epoch(progress)
            if end.ends_run:
                break
            if end is EpochEnd.EXHAUSTED and self.data.streamed:
                if self.position.batch_in_epoch == 0:
                    raise ClipforgeError(
                        f"the shards {self.data.shards} yielded no complete batch of {self.cfg.batch_size}")
                self._end_of_epoch(progress, complete=True)
            self.position.next_epoch()
            if self.data.streamed:
                self._save("last")
        progress.close()
        bad, seen = self.bad_images.check(self.info, self.device)
        if self.info.is_main:
            self._finish(progress, bad, seen)
        barrier(self.info)
        return self.last_metrics

    def _run_epoch(self, progress: Progress) -> EpochEnd:
        """Train from the current position until this epoch's data or the run's budget ends; say which."""
        loader = make_train_loader(self.data, self.cfg, model_cfg=self.model.cfg, info=self.info, device=self.device,
                                   epoch=self.position.epoch, start_batch=self.position.batch_in_epoch)
        while True:
            batch = self._next_batch(loader)
            if batch is None:
                return EpochEnd.EXHAUSTED
            stats = self._step(batch)
            end = self._after_step(stats, progress)
            if end is not None:
                return end

    def _next_batch(self, loader: Iterator[dict]) -> dict | None:
        batch = next(loader, None)
        if (self.info.enabled and self.data.streamed  # stop together when any rank's stream runs dry
                and not all_reduce_min(int(batch is not None), self.info, self.device)):
            batch = None
        return batch

    def _step(self, batch: dict) -> dict[str, float]:
        self.bad_images.count(batch)
        stats = self._optimise(batch)
        self.position.advance()
        self.window.add(int(stats["batch"]) * self.info.world_size)
        return stats

    def _after_step(self, stats: dict[str, float], progress: Progress) -> EpochEnd | None:
        """Log, evaluate and save as this step calls for; why the epoch ends here, or None to go on."""
        cfg, step = self.cfg, self.position.step
        per_epoch = self.schedule.steps_per_epoch
        epoch_complete = per_epoch is not None and self.position.batch_in_epoch >= per_epoch
        self.clock.sync(self.info, self.device)
        end: EpochEnd | None = None
        if step >= self.schedule.total_steps:
            end = EpochEnd.STEP_BUDGET
        elif self.clock.out_of_time():
            end = EpochEnd.TIME_BUDGET
        elif epoch_complete:
            end = EpochEnd.COMPLETE
        progress.update(1, loss=stats["loss"], lr=stats["lr"], temp=stats["temperature"],
                        sps=self.window.samples / self.window.seconds())
        if step % cfg.log_every == 0 or end is not None:
            self._log_train(stats)
        periodic = bool(cfg.save_every) and step % cfg.save_every == 0
        if end is not None:
            self._end_of_epoch(progress, complete=epoch_complete)
        elif periodic:
            self.bad_images.sync(self.info, self.device)  # every rank: the saved state carries the run's totals
        if end is not None or periodic:
            self._save("last")
        if periodic:
            self._save_step_checkpoint()
        return end

    def _batch_to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pixels = batch["pixels"]
        captions = batch["captions"]
        if self.info.enabled:  # every rank must contribute the same number of pairs
            n = all_reduce_min(len(captions), self.info, self.device)
            pixels, captions = pixels[:n], captions[:n]
        ids = self.tokenizer.encode(list(captions)) if captions else torch.zeros((0, 2), dtype=torch.long)
        groups = None
        if self.cfg.group_duplicate_captions:  # hashed on the CPU copy: no device round trip
            groups = caption_groups(ids, self.model.cfg.pad_token_id).to(self.device, non_blocking=True)
        return pixels.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True), groups

    def _optimise(self, batch: dict) -> dict[str, float]:
        """One optimiser step on a batch at the scheduled learning rate; the step's training stats."""
        cfg = self.cfg
        lr = lr_at(self.position.step, self.schedule.total_steps, peak_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                   min_lr=cfg.min_lr, time_fraction=self.clock.budget_fraction())
        set_lr(self.optimizer, lr)
        pixels, ids, groups = self._batch_to_device(batch)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        grad_norm = float("nan")
        if pixels.shape[0] >= 2:
            loss = forward_backward(self.module, pixels, ids, accum_steps=cfg.accum_steps, autocast=autocast,
                                    groups=groups)
            if self.info.enabled:  # report the global-batch loss: the mean of the ranks' local losses
                loss = all_reduce_sum([loss], self.info, self.device)[0] / self.info.world_size
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            self.optimizer.step()
            self.model.clamp_logit_scale_()
        else:  # (almost) every image of the batch was unreadable: nothing to learn from
            loss = float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "temperature": 1.0 / float(self.model.scale().detach()), "grad_norm": grad_norm,
                "batch": float(pixels.shape[0])}

    # ------------------------------------------------------------------ reports
    def _log_run_start(self) -> None:
        n_train = len(self.data.train_records) if self.data.train_records is not None else None
        self.logger.log("run", 0, {"n_train": n_train, "n_val": len(self.data.val.records) if self.data.val else 0,
                                   "total_steps": self.schedule.total_steps,
                                   "params": self.model.num_params()["total"], "world_size": self.info.world_size,
                                   "device": str(self.device)})

    def _log_train(self, stats: dict[str, float]) -> None:
        seconds = self.window.seconds()
        record = {**stats, "epoch": self.position.epoch, "steps_per_s": self.window.steps / seconds,
                  "samples_per_s": self.window.samples / seconds, "elapsed_s": self.clock.elapsed()}
        device_peak_flops = peak_flops(self.device)
        mfu = self.model.estimate_mfu(record["samples_per_s"], device_peak_flops) if device_peak_flops else math.nan
        if math.isfinite(mfu):  # no estimate for transformers towers
            record["mfu"] = mfu
        self.logger.log("train", self.position.step, record)
        self.window = ThroughputWindow()

    def _end_of_epoch(self, progress: Progress, complete: bool) -> None:
        """Evaluate, log, keep the best checkpoint, check the bad-image budget, call the epoch hook."""
        self.bad_images.check(self.info, self.device)
        metrics = self._evaluate()
        per_epoch = self.schedule.steps_per_epoch
        if complete or per_epoch is None:
            metrics["epoch"] = float(self.position.epoch + 1)
        else:
            metrics["epoch"] = self.position.epoch + self.position.batch_in_epoch / per_epoch
        self.last_metrics = metrics
        if self.info.is_main:
            self.logger.log("val", self.position.step, metrics)
            shown = {k: v for k, v in metrics.items() if k in ("val_loss", "i2t_r1", "t2i_r1", "zeroshot_top1")}
            progress.write(f"epoch {metrics['epoch']:.2f} step {self.position.step}: "
                           + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            if self.best.improves(metrics):
                self.best.value = float(metrics[self.best.name])
                self._save("best", with_state=False)
        if self.on_epoch_end is not None:
            self.on_epoch_end(math.ceil(metrics["epoch"]), metrics)

    def _finish(self, progress: Progress, bad: int, seen: int) -> None:
        from .plots import write_plots

        summary = dict(self.last_metrics)
        summary["n_bad_images"] = bad
        summary["n_images_seen"] = seen
        self.logger.log("summary", self.position.step, summary)
        progress.write(f"done: {self.position.step} steps; {bad} of {seen} training images were unreadable and skipped")
        if self.cfg.plots:
            try:
                write_plots(self.out)
            except Exception as exc:  # noqa: BLE001 - plots are a convenience; never fail a finished run over them
                progress.write(f"warning: plots not written: {exc}")


@contextmanager
def _process_settings_restored(threads: int | None) -> Iterator[None]:
    """Leave the process as we found it (tests, notebooks, tune trials): thread count and deterministic mode."""
    saved_threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def train(cfg: TrainConfig, resume: bool = False, on_epoch_end: EpochCallback | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last evaluation metrics."""
    with _process_settings_restored(cfg.threads):
        try:
            trainer = Trainer(cfg, resume=resume, on_epoch_end=on_epoch_end)
            try:
                return trainer.run()
            finally:
                trainer.logger.close()
        finally:
            shutdown_distributed()
