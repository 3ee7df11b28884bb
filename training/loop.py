"""The training loop: setup, steps, per-epoch evaluation, checkpoints, resume, logs.

Run layout (cfg.out):
    train_config.json     the validated config
    last/                 newest checkpoint, with trainer state (what --resume reads)
    best/                 best checkpoint by cfg.best_metric (model only)
    checkpoints/step-N/   every save_every steps, with trainer state (newest keep_checkpoints kept)
    metrics.jsonl, tensorboard/, plots/
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model import CLIP, CLIPTokenizer, caption_groups, load_checkpoint
from model.clip import peak_flops
from model.errors import ClipforgeError, ConfigError

from .config import TrainConfig, load_saved_config
from .distributed import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from .evaluate import evaluate, zeroshot_only
from .logs import METRICS_FILE, Progress, RunLogger, truncate_metrics
from .optim import build_optimizer, lr_at, set_lr
from .run_data import RunData, make_train_loader, resolve_data, steps_per_epoch
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
from .step import ContrastiveModule, forward_backward

EpochCallback = Callable[[int, dict[str, Any]], None]


def resolve_best_metric(cfg: TrainConfig, run: RunData) -> tuple[str | None, str]:
    """(metric name, "max"/"min") that picks the best checkpoint."""
    if cfg.best_metric != "auto":
        name = cfg.best_metric
        return name, "min" if "loss" in name else "max"
    if run.zeroshot is not None or (run.val is not None and run.val.class_names):
        return "zeroshot_top1", "max"
    if run.val is not None:
        return "recall_mean", "max"
    return None, "max"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_tokenizer(cfg: TrainConfig, captions: Iterable[str]) -> CLIPTokenizer:
    """The tokenizer a new run trains on its captions: the model's vocab and context, the config's normalisation."""
    mcfg = cfg.model_cfg()
    return CLIPTokenizer.train(captions, vocab_size=mcfg.vocab_size, max_length=mcfg.max_seq_len,
                               **cfg.tokenizer_options())


class Trainer:
    """Builds everything from a TrainConfig and runs to completion (or resumes a killed run)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, on_epoch_end: EpochCallback | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.on_epoch_end = on_epoch_end
        self.out = Path(cfg.out)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.info, self.device = init_distributed(cfg.device)
        info = self.info
        if self.device.type == "cpu" and cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        if info.is_main:
            self._prepare_run_dir()
        barrier(info)
        self.run = resolve_data(cfg)
        self.spe = steps_per_epoch(self.run, cfg)
        total = cfg.epochs * self.spe if self.spe is not None else cfg.max_steps
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.best_name, self.best_mode = resolve_best_metric(cfg, self.run)
        if cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"):
            self.amp_dtype: torch.dtype | None = torch.bfloat16
        else:
            self.amp_dtype = None

        self.resume_dir = find_resumable(self.out / "last") if self.resume else None
        if self.resume and self.resume_dir is None:
            raise ClipforgeError(f"--resume: {self.out} holds no resumable checkpoint (last/ is missing)")
        self.model, self.tokenizer = self._build_model()
        if info.rank > 0:  # same initial weights everywhere, but each rank its own dropout masks
            seed_everything(cfg.seed + 1_000_003 * info.rank)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps,
                                         self.device, cfg.text_lr_scale)
        module: nn.Module = ContrastiveModule(self.model)
        if info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if cfg.compile:
            module = torch.compile(module)
        self.module = module
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_value: float | None = None
        self.n_bad = self.n_seen = 0  # this rank's counts (rank 0's include those restored from a resumed run)
        self.bad_totals = (0, 0)  # all ranks together, as of the last check: saved with the trainer state
        self.last_metrics: dict[str, Any] = {}
        self.elapsed_before, self.start_time = 0.0, time.monotonic()
        if self.resume_dir is not None:
            self._restore()
        self.logger = RunLogger(self.out, enabled=info.is_main, tensorboard=cfg.tensorboard)

    def _prepare_run_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(".*.stage-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.resume:
            saved = load_saved_config(self.out)
            for key in ("data", "preset", "model", "batch_size", "seed", "max_samples", "val_fraction"):
                if getattr(saved, key) != getattr(self.cfg, key):
                    raise ConfigError(
                        f"--resume: {key} differs from the run's saved config ({getattr(saved, key)!r} vs "
                        f"{getattr(self.cfg, key)!r}); resume with the same settings"
                    )
        elif (self.out / "last").exists() or find_resumable(self.out / "last") is not None:
            raise ClipforgeError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        else:  # a folder whose run never reached a checkpoint starts over
            (self.out / METRICS_FILE).unlink(missing_ok=True)
        self.cfg.save(self.out)

    def _build_model(self) -> tuple[CLIP, CLIPTokenizer]:
        cfg = self.cfg
        source = self.resume_dir or (Path(cfg.init_checkpoint) if cfg.init_checkpoint else None)
        if source is not None:
            model, tokenizer, _ = load_checkpoint(source, device="cpu")
            model.train()
            return model, tokenizer
        mcfg = cfg.model_cfg()
        tok_path = self.out / "tokenizer.json"
        if self.info.is_main:
            tokenizer = train_tokenizer(cfg, self.run.captions_for_tokenizer)
            tokenizer.save(tok_path)
        barrier(self.info)
        if not self.info.is_main:
            tokenizer = CLIPTokenizer.load(tok_path)
        if tokenizer.vocab_size > mcfg.vocab_size:
            raise ConfigError(
                f"the tokenizer trained on the captions has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{mcfg.vocab_size} (byte-level BPE needs at least 259); raise it, e.g. --set vocab_size=512"
            )
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every rerun
        model = CLIP(mcfg)
        model.train()
        return model, tokenizer

    def _restore(self) -> None:
        tensors, info = load_trainer_state(self.resume_dir)
        optim_sd = optimizer_from_flat(tensors, info["optimizer"])
        self.optimizer.load_state_dict(optim_sd)
        restore_rng(*rank_rng(tensors, info, self.info.rank))
        self.step = int(info["step"])
        self.epoch = int(info["epoch"])
        self.batch_in_epoch = int(info["batch_in_epoch"])
        self.best_value = info.get("best_value")
        if self.info.is_main:  # run totals, counted once: the other ranks count only from here on
            self.n_bad, self.n_seen = int(info.get("n_bad", 0)), int(info.get("n_seen", 0))
        self.last_metrics = info.get("last_metrics", {})
        self.elapsed_before = float(info.get("elapsed_s", 0.0))
        if self.info.is_main:
            truncate_metrics(self.out, self.step)

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "metrics": self.last_metrics,
                                "data": self.cfg.data, "train_config": self.cfg.model_dump()}
        if self.run.class_names:
            meta["class_names"] = list(self.run.class_names)
            meta["templates"] = list(self.run.templates or [])
        return meta

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best_value": self.best_value, "best_metric": self.best_name, "n_bad": self.bad_totals[0],
                "n_seen": self.bad_totals[1], "last_metrics": self.last_metrics, "total_steps": self.total_steps,
                "elapsed_s": self._elapsed()}

    def _save(self, name: str, with_state: bool = True) -> None:
        """Rank 0 writes; with the trainer state it is a collective (every rank sends its RNG states)."""
        peers = all_gather_objects(capture_rng(), self.info) if with_state and self.info.enabled else None
        if not self.info.is_main:
            return
        save_training_checkpoint(self.out / name, self.model, self.tokenizer, self._meta(),
                                 self.optimizer if with_state else None, self._trainer_state(), peers)
        for stale in self.out.glob(f".{Path(name).name}.old-*"):  # left by a kill between two renames
            shutil.rmtree(stale, ignore_errors=True)

    def _save_step_checkpoint(self) -> None:
        if self.cfg.keep_checkpoints == 0:
            return
        self._save(f"checkpoints/step-{self.step:08d}")
        if self.info.is_main:
            prune_step_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.info.is_main:
            if self.run.val is not None:
                val = self.run.val
                metrics.update(evaluate(
                    self.model, self.tokenizer, val.records, self.device, class_names=val.class_names,
                    templates=val.templates, loss_batch_size=self.cfg.batch_size, batch_size=self.cfg.eval_batch_size,
                    num_workers=self.cfg.num_workers, autocast_dtype=self.amp_dtype,
                ))
                metrics = {("val_" + k if k.startswith("n_") else k): v for k, v in metrics.items()}
            if self.run.zeroshot is not None:
                zs = self.run.zeroshot
                if "zeroshot_top1" in metrics:
                    metrics["val_zeroshot_top1"] = metrics.pop("zeroshot_top1")
                    metrics["val_zeroshot_top5"] = metrics.pop("zeroshot_top5")
                res = zeroshot_only(self.model, self.tokenizer, zs.records, zs.class_names, zs.templates, self.device,
                                    self.cfg.eval_batch_size, self.cfg.num_workers, self.amp_dtype)
                metrics["zeroshot_top1"], metrics["zeroshot_top5"] = res["top1"], res["top5"]
        barrier(self.info)
        return metrics

    def _is_better(self, metrics: dict[str, Any]) -> bool:
        if self.best_name is None or self.best_name not in metrics:
            return False
        value = float(metrics[self.best_name])
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.best_mode == "max" else value < self.best_value

    # ------------------------------------------------------------------ the loop
    def _sync_bad(self) -> tuple[int, int]:
        """(bad, seen) training images over all ranks (a collective: every rank calls it), kept for the saved state."""
        n_bad, n_seen = all_reduce_sum([float(self.n_bad), float(self.n_seen)], self.info, self.device)
        self.bad_totals = (int(n_bad), int(n_seen))
        return self.bad_totals

    def _check_bad(self) -> tuple[int, int]:
        """(bad, seen) over all ranks; raises DataError above max_bad_fraction."""
        from training.data import check_bad_fraction

        check_bad_fraction(*self._sync_bad(), self.cfg.max_bad_fraction)
        return self.bad_totals

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

    def _train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        time_fraction = self.clock / (cfg.max_minutes * 60) if cfg.max_minutes else None
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr, time_fraction)
        set_lr(self.optimizer, lr)
        pixels, ids, groups = self._batch_to_device(batch)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        grad_norm = float("nan")
        if pixels.shape[0] >= 2:
            loss = forward_backward(self.module, pixels, ids, cfg.accum_steps, autocast, groups)
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

    def run_training(self) -> dict[str, Any]:
        """Train to the end of the schedule (or max_minutes) and return the final metrics."""
        threads = torch.get_num_threads()
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            self._setup()
            try:
                return self._loop()
            finally:
                self.logger.close()
        finally:
            shutdown_distributed()
            torch.set_num_threads(threads)  # leave the process as we found it (tests, notebooks, tune trials)
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])

    def _loop(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        progress = Progress(self.total_steps, self.step, cfg.progress and info.is_main)
        if info.is_main and self.step == 0:
            n_train = len(self.run.train_records) if self.run.train_records is not None else None
            self.logger.log("run", 0, {"n_train": n_train, "n_val": len(self.run.val.records) if self.run.val else 0,
                                       "total_steps": self.total_steps, "params": self.model.num_params()["total"],
                                       "world_size": info.world_size, "device": str(self.device)})
        self.start_time = time.monotonic()
        # The time budget is read from one clock shared by all ranks (the slowest rank's), so
        # every rank stops at the same step and follows the same learning-rate schedule.
        self.clock = self.elapsed_before
        self.window = [time.monotonic(), 0, 0]  # start, samples, steps
        stop = False
        while self.step < self.total_steps and not stop:
            loader, spe = make_train_loader(self.run, cfg, self.model.cfg, info, self.device, self.epoch,
                                            self.batch_in_epoch)
            exhausted = False
            while True:
                batch = next(loader, None)
                if info.enabled and self.run.streamed:  # stop together when any rank's stream runs dry
                    if not all_reduce_min(int(batch is not None), info, self.device):
                        batch = None
                if batch is None:
                    exhausted = True
                    break
                stats = self._one_step(batch)
                epoch_end = spe is not None and self.batch_in_epoch >= spe
                if cfg.max_minutes is not None:
                    self.clock = all_reduce_max(self._elapsed(), info, self.device)
                timed_out = cfg.max_minutes is not None and self.clock >= cfg.max_minutes * 60
                finished = self.step >= self.total_steps or timed_out
                progress.update(1, loss=stats["loss"], lr=stats["lr"], temp=stats["temperature"],
                                sps=self.window[1] / max(1e-9, time.monotonic() - self.window[0]))
                if self.step % cfg.log_every == 0 or finished or epoch_end:
                    self._log_train(stats)
                periodic = bool(cfg.save_every) and self.step % cfg.save_every == 0
                if epoch_end or finished:
                    self._end_of_epoch(progress, complete=epoch_end)
                if periodic and not (epoch_end or finished):
                    self._sync_bad()  # every rank: the saved state carries the run's totals
                if epoch_end or finished or periodic:
                    self._save("last")
                if periodic:
                    self._save_step_checkpoint()
                if finished:
                    stop = True
                    break
                if epoch_end:
                    break
            if stop:
                break
            if exhausted and self.run.streamed:
                if self.batch_in_epoch == 0:
                    raise ClipforgeError(f"the shards {self.run.shards} yielded no complete batch of {cfg.batch_size}")
                self._end_of_epoch(progress, complete=True)
            self.epoch += 1
            self.batch_in_epoch = 0
            if self.run.streamed:
                self._save("last")
        progress.close()
        n_bad, n_seen = self._check_bad()
        if info.is_main:
            self._finish(progress, n_bad, n_seen)
        barrier(info)
        return self.last_metrics

    def _elapsed(self) -> float:
        """Training wall time of the run so far, including the parts before a resume."""
        return self.elapsed_before + time.monotonic() - self.start_time

    def _one_step(self, batch: dict) -> dict[str, float]:
        self.n_bad += batch["n_bad"]
        self.n_seen += batch["n_bad"] + len(batch["captions"])
        stats = self._train_step(batch)
        self.step += 1
        self.batch_in_epoch += 1
        self.window[1] += int(stats["batch"]) * self.info.world_size
        self.window[2] += 1
        return stats

    def _log_train(self, stats: dict[str, float]) -> None:
        start, samples, steps = self.window
        dt = max(1e-9, time.monotonic() - start)
        rec = {**stats, "epoch": self.epoch, "steps_per_s": steps / dt, "samples_per_s": samples / dt,
               "elapsed_s": self._elapsed()}
        pflops = peak_flops(self.device)
        if pflops:
            rec["mfu"] = self.model.estimate_mfu(rec["samples_per_s"], pflops)
        self.logger.log("train", self.step, rec)
        self.window = [time.monotonic(), 0, 0]

    def _end_of_epoch(self, progress: Progress, complete: bool) -> None:
        """Evaluate, log, keep the best checkpoint, check the bad-image budget, call the epoch hook."""
        self._check_bad()
        metrics = self._evaluate()
        if complete or self.spe is None:
            metrics["epoch"] = float(self.epoch + 1)
        else:
            metrics["epoch"] = self.epoch + self.batch_in_epoch / self.spe
        self.last_metrics = metrics
        if self.info.is_main:
            self.logger.log("val", self.step, metrics)
            shown = {k: v for k, v in metrics.items() if k in ("val_loss", "i2t_r1", "t2i_r1", "zeroshot_top1")}
            progress.write(f"epoch {metrics['epoch']:.2f} step {self.step}: "
                           + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            if self._is_better(metrics):
                self.best_value = float(metrics[self.best_name])
                self._save("best", with_state=False)
        if self.on_epoch_end is not None:
            self.on_epoch_end(int(math.ceil(metrics["epoch"])), metrics)

    def _finish(self, progress: Progress, n_bad: int, n_seen: int) -> None:
        from .plots import write_plots

        summary = dict(self.last_metrics)
        summary["n_bad_images"] = n_bad
        summary["n_images_seen"] = n_seen
        self.logger.log("summary", self.step, summary)
        msg = f"done: {self.step} steps; {n_bad} of {n_seen} training images were unreadable and skipped"
        progress.write(msg)
        if self.cfg.plots:
            try:
                write_plots(self.out)
            except Exception as exc:  # plots are a convenience; never fail a finished run over them
                progress.write(f"warning: plots not written: {exc}")


def train(cfg: TrainConfig, resume: bool = False, on_epoch_end: EpochCallback | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last evaluation metrics."""
    return Trainer(cfg, resume=resume, on_epoch_end=on_epoch_end).run_training()
