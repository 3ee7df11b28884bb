"""`clipforge tune`: an Optuna study in SQLite with per-epoch reports, resumable by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_support import write_caption_data

import clipforge_cli


@pytest.mark.slow
def test_tune_two_trials_then_continue(tmp_path: Path, capsys) -> None:
    import optuna

    data = write_caption_data(tmp_path / "data", n=40)
    space = tmp_path / "space.toml"
    space.write_text("width = [32, 64]\nhead_dim = 32\nimg_layers = [1, 1]\ntext_layers = [1, 1]\n"
                     "batch_size = [8, 16]\nlr = [1e-4, 1e-2]\n", encoding="utf-8")
    out = tmp_path / "tune"
    argv = ["tune", "--data", f"csv:{data}", "--out", str(out), "--preset", "mini-32", "--set", "patch_size=8",
            "--set", "vocab_size=512", "--epochs", "2", "--num-workers", "0", "--val-fraction", "0.25",
            "--no-plots", "--keep-checkpoints", "0", "--threads", "1", "--space", str(space), "--study", "s1"]
    assert clipforge_cli.main(argv + ["--trials", "2"]) == 0
    best = json.loads((out / "best_params.json").read_text())
    assert best["metric"] == "recall_mean" and best["n_trials"] == 2
    assert set(best["best_params"]) == {"width", "dropout", "img_layers", "text_layers", "init_temperature", "lr",
                                        "weight_decay", "batch_size"}
    assert (out / "optimization_history.png").stat().st_size > 1000
    assert (out / "param_importances.png").stat().st_size > 1000
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{out / 'study.db'}")
    first = study.trials[0]
    assert sorted(first.intermediate_values) == [1, 2]  # reported every epoch: what the pruner decides on
    # the same study name continues the same study
    assert clipforge_cli.main(argv + ["--trials", "1"]) == 0
    assert json.loads((out / "best_params.json").read_text())["n_trials"] == 3


def test_bad_search_space_is_one_line_error(tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.toml"
    space.write_text("widths = [32]\n", encoding="utf-8")
    code = clipforge_cli.main(["tune", "--data", "x", "--out", str(tmp_path / "t"), "--space", str(space)])
    assert code == 2
    assert "unknown search-space key(s)" in capsys.readouterr().err


def test_tune_under_torchrun_is_refused(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank would draw its own trial; the study runs in one process, and says so."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = clipforge_cli.main(["tune", "--data", "x", "--out", str(tmp_path / "t")])
    assert code == 2
    assert "without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
