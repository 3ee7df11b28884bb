"""End-to-end training runs on tiny data: determinism, resume after SIGKILL, atomic checkpoints,
bad images, logs and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import (
    SMALL,
    assert_same_weights,
    base_config,
    write_caption_data,
    write_imagefolder,
    write_shards,
)

import clipforge_cli
from model import load_checkpoint, read_meta
from model.errors import ClipforgeError
from training.config import build_config
from training.data import DataError
from training.loop import train
from training.run_state import find_resumable, load_trainer_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("caps"), n=48)


def test_two_runs_give_identical_weights(caption_data: Path, tmp_path: Path) -> None:
    a = train(build_config(base_config(caption_data, tmp_path / "a", max_steps=3)))
    b = train(build_config(base_config(caption_data, tmp_path / "b", max_steps=3)))
    assert_same_weights(tmp_path / "a" / "last", tmp_path / "b" / "last", atol=0.0)
    assert a["val_loss"] == b["val_loss"]
    c = train(build_config(base_config(caption_data, tmp_path / "c", max_steps=3, seed=1)))
    assert c["val_loss"] != a["val_loss"]  # the seed matters


CHILD = """
import json, sys
from training.config import build_config
from training.loop import train
train(build_config(json.loads(sys.argv[1])))
"""


def _last_step(run: Path) -> int:
    try:
        return int(json.loads((run / "last" / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def test_resume_after_sigkill_equals_uninterrupted(caption_data: Path, tmp_path: Path) -> None:
    # 2 epochs of 4 steps, so the resumed part crosses an epoch boundary (new shuffle, new captions).
    common = {"epochs": 2, "save_every": 1, "model": {**SMALL, "img_dropout_rate": 0.1, "text_dropout_rate": 0.1}}
    ref = build_config(base_config(caption_data, tmp_path / "ref", **common))
    train(ref)
    total = load_trainer_state(tmp_path / "ref" / "last")[1]["step"]
    spe = total // 2

    run = tmp_path / "killed"
    cfg = build_config(base_config(caption_data, run, **common))
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg.model_dump())], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _last_step(run) < 2:
            assert child.poll() is None, f"child ended early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "child made no checkpoint in time"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = _last_step(run)
    assert 2 <= killed_at < total, "the kill must land mid-run"

    train(cfg, resume=True)
    assert _last_step(run) == total
    assert_same_weights(tmp_path / "ref" / "last", run / "last", atol=1e-6)
    ta, ia = load_trainer_state(tmp_path / "ref" / "last")
    tb, ib = load_trainer_state(run / "last")
    for key in ta:
        if key.startswith("optim."):
            assert torch.allclose(ta[key], tb[key], atol=1e-6), key
    assert ia["epoch"] == ib["epoch"] and ia["batch_in_epoch"] == ib["batch_in_epoch"]
    # the metrics log has each step once, as if the run had never stopped
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "val"]
    assert steps == [spe, total]


SAVER = """
import sys, torch
from model import CLIP, CLIPTokenizer, preset_config
from training.run_state import save_training_checkpoint
torch.manual_seed(0)
model = CLIP(preset_config("mini-32", img_n_layers=1, text_n_layers=1, vocab_size=300))
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(2, 3, 32, 32), torch.tensor([[1, 5, 2], [1, 6, 2]]))[0].sum().backward()
opt.step()
tok = CLIPTokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=300, max_length=32)
print("ready", flush=True)
i = 0
while True:
    i += 1
    save_training_checkpoint(sys.argv[1], model, tok, {"step": i}, opt, {"step": i, "epoch": 0, "batch_in_epoch": i})
"""


def test_checkpoint_survives_sigkill_during_saves(tmp_path: Path) -> None:
    target = tmp_path / "run" / "last"
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ready", child.stderr.read().decode()[-2000:]
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.37)  # somewhere inside a later save
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    found = find_resumable(target)
    assert found is not None
    _model, _tok, meta = load_checkpoint(found)  # verifies the content hash
    tensors, info = load_trainer_state(found)
    assert info["step"] == meta["step"] >= 1 and "optim.0.exp_avg" in tensors


def test_bad_images_are_counted_and_the_budget_enforced(tmp_path: Path) -> None:
    data = write_caption_data(tmp_path / "data", n=40, n_corrupt=3)
    metrics = train(build_config(base_config(data, tmp_path / "ok", max_steps=4, val_fraction=0.0,
                                             max_bad_fraction=0.5)))
    summary = [json.loads(l) for l in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["n_images_seen"] == 32
    assert 0 < summary["n_bad_images"] <= 3
    assert metrics == {} or "val_loss" not in metrics  # no val split asked for
    with pytest.raises(DataError, match=r"were missing, corrupt or too large, more than the allowed 1\.0%"):
        train(build_config(base_config(data, tmp_path / "strict", max_steps=4, val_fraction=0.0,
                                       max_bad_fraction=0.01)))


def test_logs_plots_best_and_labelled_meta(tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "folder", per_class=5)
    cfg = build_config(base_config(data, tmp_path / "run", data=f"imagefolder:{data}", epochs=2, tensorboard=True,
                                   plots=True, val_fraction=0.25, accum_steps=2))
    metrics = train(cfg)
    run = tmp_path / "run"
    assert {"zeroshot_top1", "zeroshot_top5", "val_loss", "val_i2t_acc"} <= set(metrics)
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert (run / "plots" / "results.png").stat().st_size > 1000
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    kinds = [json.loads(l)["kind"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds[0] == "run" and kinds.count("val") == 2 and kinds[-1] == "summary"
    best = read_meta(run / "best")
    assert best["class_names"][0] == "blue circle" and best["templates"]
    assert "zeroshot_top1" in best["metrics"]
    assert not (run / "best" / "trainer_state.json").exists()  # best is a model checkpoint only
    assert read_meta(run / "last")["step"] == 2 * (30 // 8) and metrics["epoch"] == 2.0
    # plots on demand
    (run / "plots" / "loss.png").unlink()
    assert clipforge_cli.main(["train", "--plot", str(run)]) == 0
    assert (run / "plots" / "loss.png").is_file()
    # an existing run is never overwritten by accident
    with pytest.raises(ClipforgeError, match="already holds a run"):
        train(cfg)


def test_resume_refuses_changed_data(caption_data: Path, tmp_path: Path) -> None:
    cfg = build_config(base_config(caption_data, tmp_path / "r", max_steps=1, val_fraction=0.0))
    train(cfg)
    changed = build_config(base_config(caption_data, tmp_path / "r", max_steps=1, val_fraction=0.0, batch_size=4))
    with pytest.raises(ClipforgeError, match="batch_size differs"):
        train(changed, resume=True)
    # the CLI resumes from the saved config; a longer schedule may be given on resume
    assert clipforge_cli.main(["train", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "2"]) == 0
    assert read_meta(tmp_path / "r" / "last")["step"] == 2


def test_streamed_shards_train_for_max_steps(tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "shards")
    with pytest.raises(ClipforgeError, match="set samples_per_epoch or max_steps"):
        train(build_config(base_config(tmp_path, tmp_path / "nostep", data=spec, val_fraction=0.0)))
    # 24 samples, batch 8: 3 batches an epoch, so 5 steps cross into a second pass over the stream
    train(build_config(base_config(tmp_path, tmp_path / "run", data=spec, max_steps=5, log_every=1)))
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    assert read_meta(tmp_path / "run" / "last")["step"] == 5


def test_streamed_shards_with_samples_per_epoch_run_whole_epochs(caption_data: Path, tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "shards")  # 24 samples
    # 16 samples an epoch, batch 8: 2 steps an epoch, 3 epochs, no max_steps needed
    train(build_config(base_config(tmp_path, tmp_path / "run", data=spec, samples_per_epoch=16, epochs=3,
                                   val_fraction=0.0, log_every=1)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["epoch"]) for r in records if r["kind"] == "val"] == [(2, 1.0), (4, 2.0), (6, 3.0)]
    with pytest.raises(ClipforgeError, match="samples_per_epoch is for streamed"):
        train(build_config(base_config(caption_data, tmp_path / "csv", samples_per_epoch=16)))
    with pytest.raises(ClipforgeError, match="below batch_size"):
        train(build_config(base_config(tmp_path, tmp_path / "few", data=spec, samples_per_epoch=4)))


def test_init_checkpoint_reuses_weights_and_tokenizer(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    cfg = build_config(base_config(caption_data, tmp_path / "ft", init_checkpoint=str(tiny_checkpoint), max_steps=1,
                                   model={}, val_fraction=0.0, lr=1e-12, warmup_steps=0, weight_decay=0.0))
    train(cfg)
    assert (tmp_path / "ft" / "last" / "tokenizer.json").read_text() == (tiny_checkpoint / "tokenizer.json").read_text()
    assert_same_weights(tiny_checkpoint, tmp_path / "ft" / "last", atol=1e-6)  # a 1e-12 step barely moves them


def test_bf16_autocast_on_cpu_with_accumulation(caption_data: Path, tmp_path: Path) -> None:
    metrics = train(build_config(base_config(caption_data, tmp_path / "bf16", max_steps=2, precision="bf16",
                                             accum_steps=2, log_every=1)))
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 2 and all(0 < l < 10 for l in losses)
    assert weights_dtype(tmp_path / "bf16" / "last") == {torch.float32}  # master weights stay fp32
    assert metrics["val_loss"] > 0


def weights_dtype(ckpt: Path) -> set:
    return {t.dtype for t in load_file(str(ckpt / "model.safetensors")).values()}


def test_vocab_smaller_than_the_tokenizer_is_a_clear_error(caption_data: Path, tmp_path: Path) -> None:
    from test_train_support import SMALL

    from model.errors import ConfigError

    cfg = build_config(base_config(caption_data, tmp_path / "v", max_steps=1, model={**SMALL, "vocab_size": 256}))
    with pytest.raises(ConfigError, match=r"has 259 tokens but the model's vocab_size is 256"):
        train(cfg)
    # the failed start left no checkpoint, so the same folder can simply be used again
    fixed = build_config(base_config(caption_data, tmp_path / "v", max_steps=1, val_fraction=0.0))
    train(fixed)
    assert read_meta(tmp_path / "v" / "last")["step"] == 1


def test_wall_clock_budget_stops_and_decays(caption_data: Path, tmp_path: Path) -> None:
    cfg = build_config(base_config(caption_data, tmp_path / "t", epochs=500, max_minutes=0.03, log_every=1,
                                   warmup_steps=1))
    metrics = train(cfg)
    records = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert 1 <= len(train_recs) < 500 * 4  # stopped by the clock, long before the epochs ran out
    assert train_recs[-1]["elapsed_s"] >= 0.03 * 60
    assert train_recs[-1]["lr"] < cfg.lr  # the cosine moved with the clock
    assert "val_loss" in metrics and read_meta(tmp_path / "t" / "last")["step"] == train_recs[-1]["step"]
