"""`clipforge model info|presets`: parameter counts and GFLOPs, clean errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipforge_cli
from model import CLIP, PRESETS, preset_config

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = clipforge_cli.main(["model", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _counts(name: str) -> dict[str, int]:
    with torch.device("meta"):
        return CLIP(preset_config(name)).num_params()


def test_info_prints_params_per_tower_and_gflops(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "info", "thinkclip")
    assert code == 0
    counts = _counts("thinkclip")
    assert "vision 384x12 (6 heads)" in out and "text 768x12 (12 heads, 3 kv)" in out
    m = re.search(r"image\s+([\d.]+) M\s+text\s+([\d.]+) M\s+total\s+([\d.]+) M", out)
    assert m is not None
    assert [float(v) for v in m.groups()] == [round(counts[k] / 1e6, 2) for k in ("image", "text", "total")]
    g = re.search(r"per image\s+([\d.]+)\s+per text \(64 tokens\)\s+([\d.]+)", out)
    assert g is not None
    model = CLIP.__new__(CLIP)  # the FLOPs estimate needs only the config
    model.cfg = preset_config("thinkclip")
    assert float(g.group(1)) == pytest.approx(model.flops_per_image() / 1e9, abs=1e-3)
    assert float(g.group(2)) == pytest.approx(model.flops_per_text() / 1e9, abs=1e-3)
    # ViT-B/16 is quoted at ~17.5 G multiply-adds per 224 px image: ~35 GFLOPs at 2 FLOPs each.
    _, out_b, _ = _run(capsys, "info", "vit-b-16")
    gflops = float(re.search(r"per image\s+([\d.]+)", out_b).group(1))
    assert 34.0 < gflops < 36.5


def test_info_json_and_checkpoint_directory(capsys: pytest.CaptureFixture, tiny_checkpoint: Path) -> None:
    code, out, _ = _run(capsys, "info", "tiny", "--json")
    data = json.loads(out)
    assert code == 0 and data["config"] == preset_config("tiny").to_dict()
    assert data["params_total"] == _counts("tiny")["total"]
    code, out, _ = _run(capsys, "info", str(tiny_checkpoint), "--json")
    assert code == 0 and json.loads(out)["config"]["img_size"] == 32


def test_presets_lists_every_preset(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "presets")
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == list(PRESETS)


def test_errors_are_one_line_with_exit_code_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "info", "huge")
    assert code == 2 and err.startswith("clipforge: error: unknown preset 'huge'") and "Traceback" not in err
    (tmp_path / "config.json").write_text("{broken")
    code, _, err = _run(capsys, "info", str(tmp_path))
    assert code == 2 and "config.json is not valid JSON" in err
    (tmp_path / "config.json").write_text(json.dumps({"wings": 2}))
    code, _, err = _run(capsys, "info", str(tmp_path))
    assert code == 2 and "unknown config field(s): wings" in err


def test_console_entry_point_runs_in_a_fresh_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "clipforge_cli", "model", "info", "mini-32"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mini-32: image 32px/4")
