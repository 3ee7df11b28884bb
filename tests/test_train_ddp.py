"""DDP: two gloo processes under torchrun train exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_train_support import (
    assert_same_weights,
    base_config,
    write_caption_data,
    write_shards,
)
from torchrun_helpers import run_torchrun

from training.config import build_config
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def _torchrun(values: dict, cfg_file: Path, timeout: float = 240, extra: tuple[str, ...] = ()) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m training.cli train --config FILE`, killed whole on a hang."""
    cfg = build_config(values)
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.model_dump().items() if v is not None and k != "model"]
    lines.append("[model]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in cfg.model.items()]
    cfg_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, err = run_torchrun(["--standalone", "--nproc_per_node", "2"],
                             ["training.cli", "train", "--config", str(cfg_file), *extra],
                             cfg_file.with_suffix(".log"), timeout=timeout)
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    data = write_caption_data(tmp_path / "data", n=40)
    settings = {"max_steps": 3, "log_every": 1, "val_fraction": 0.0, "accum_steps": 2}
    single = build_config(base_config(data, tmp_path / "single", **settings))
    train(single)

    _torchrun(base_config(data, tmp_path / "ddp", **settings), tmp_path / "ddp.toml")
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert_same_weights(tmp_path / "single" / "last", tmp_path / "ddp" / "last", atol=1e-4)
    run_record = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert run_record["world_size"] == 2


@pytest.mark.slow
def test_ddp_with_a_validation_split_evaluates_on_rank_zero_and_finishes(tmp_path: Path) -> None:
    """Rank 0 evaluates alone while rank 1 waits: the validation loss must not gather across ranks
    (it once did, and the run hung after its first evaluation)."""
    data = write_caption_data(tmp_path / "data", n=40)
    _torchrun(base_config(data, tmp_path / "ddp", max_steps=2, log_every=1, val_fraction=0.2), tmp_path / "ddp.toml",
              timeout=180)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals and all(r["val_loss"] > 0 for r in evals)
    assert (tmp_path / "ddp" / "best" / "meta.json").is_file()


@pytest.mark.slow
def test_ranks_share_one_clock_for_the_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-minutes under DDP: rank 1's clock runs 4x fast here (a sitecustomize in its interpreter),
    so on its own it would stop steps before rank 0 and leave rank 0 alone in the next step's
    collective. With one shared clock (the slowest rank's view of the time) both stop together."""
    skew = tmp_path / "skew"
    skew.mkdir()
    (skew / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    _real = time.monotonic\n"
        "    _t0 = _real()\n"
        "    time.monotonic = lambda: _t0 + 4.0 * (_real() - _t0)\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(skew), os.environ.get("PYTHONPATH")])))
    data = write_caption_data(tmp_path / "data", n=40)
    _torchrun(base_config(data, tmp_path / "ddp", max_minutes=0.1, epochs=10_000, log_every=1, val_fraction=0.0),
              tmp_path / "ddp.toml", timeout=150)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if r["kind"] == "train"]
    assert train_steps and train_steps[-1]["elapsed_s"] < 6 * 0.9, "stopped on the fast clock, well before 6 s"


@pytest.mark.slow
def test_streamed_shards_split_evenly_across_ranks_with_samples_per_epoch(tmp_path: Path) -> None:
    """Three shards of 8 on two ranks: rank 0 reads shards 0 and 2, rank 1 only shard 1. Without a
    fixed epoch size the epoch ends when rank 1 runs dry (2 steps, rank 0's extra shard unread);
    with samples_per_epoch every rank reads 12 samples an epoch (rank 1 goes round its shard again)."""
    spec = write_shards(tmp_path / "shards", n_shards=3, per_shard=8)
    _torchrun(base_config(tmp_path, tmp_path / "ddp", data=spec, samples_per_epoch=24, epochs=2, val_fraction=0.0,
                          log_every=1), tmp_path / "ddp.toml", timeout=180)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["epoch"]) for r in records if r["kind"] == "val"] == [(3, 1.0), (6, 2.0)]


def _summary(run: Path) -> dict:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "summary"][-1]


@pytest.mark.slow
def test_resumed_ddp_run_counts_unreadable_images_like_an_uninterrupted_one(tmp_path: Path) -> None:
    """The counts of unreadable images are run totals over all ranks. They were saved as rank 0's own
    count and restored on every rank, so a resumed run reported rank 0's share times the world size."""
    data = write_caption_data(tmp_path / "data", n=40, n_corrupt=12)
    settings = {"log_every": 1, "val_fraction": 0.0, "max_bad_fraction": 0.9, "epochs": 2}  # 5 steps an epoch
    _torchrun(base_config(data, tmp_path / "whole", max_steps=8, **settings), tmp_path / "whole.toml")
    _torchrun(base_config(data, tmp_path / "split", max_steps=3, save_every=3, **settings), tmp_path / "a.toml")
    _torchrun(base_config(data, tmp_path / "split", max_steps=8, save_every=3, **settings), tmp_path / "b.toml",
              extra=("--resume", "--out", str(tmp_path / "split")))
    whole, split = _summary(tmp_path / "whole"), _summary(tmp_path / "split")
    assert whole["n_images_seen"] == 8 * 8
    assert 0 < whole["n_bad_images"] < whole["n_images_seen"]
    assert (split["n_bad_images"], split["n_images_seen"]) == (whole["n_bad_images"], whole["n_images_seen"])


@pytest.mark.slow
def test_ddp_resume_with_dropout_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Each rank draws its own dropout masks and resumes its own random streams: only rank 0's were
    saved once, so rank 1 resumed on rank 0's stream and the weights parted from the uninterrupted run."""
    from test_train_support import SMALL

    data = write_caption_data(tmp_path / "data", n=40)
    settings = {"log_every": 1, "val_fraction": 0.0, "epochs": 2, "model": {**SMALL, "img_dropout_rate": 0.2,
                                                                           "text_dropout_rate": 0.2}}
    _torchrun(base_config(data, tmp_path / "whole", max_steps=6, **settings), tmp_path / "whole.toml")
    _torchrun(base_config(data, tmp_path / "split", max_steps=3, save_every=3, **settings), tmp_path / "a.toml")
    _torchrun(base_config(data, tmp_path / "split", max_steps=6, save_every=3, **settings), tmp_path / "b.toml",
              extra=("--resume", "--out", str(tmp_path / "split")))
    assert_same_weights(tmp_path / "whole" / "last", tmp_path / "split" / "last", atol=1e-6)
