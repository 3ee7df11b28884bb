"""DDP: two gloo processes under torchrun train exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import build_config
from training.loop import train

from test_train_support import assert_same_weights, base_config, write_caption_data

ROOT = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    data = write_caption_data(tmp_path / "data", n=40)
    settings = dict(max_steps=3, log_every=1, val_fraction=0.0, accum_steps=2)
    single = build_config(base_config(data, tmp_path / "single", **settings))
    train(single)

    ddp = build_config(base_config(data, tmp_path / "ddp", **settings))
    cfg_file = tmp_path / "ddp.toml"
    lines = []
    for key, value in ddp.model_dump().items():
        if value is None:
            continue
        if key == "model":
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    lines.append("[model]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in ddp.model.items()]
    cfg_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.cli", "train", "--config", str(cfg_file)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert_same_weights(tmp_path / "single" / "last", tmp_path / "ddp" / "last", atol=1e-4)
    run_record = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert run_record["world_size"] == 2
