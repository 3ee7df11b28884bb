"""TrainConfig validation, TOML + flag precedence, and one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import clipforge_cli
from model.errors import ConfigError
from training.config import TrainConfig, build_config, load_config, load_saved_config


def test_defaults_and_model_overrides() -> None:
    cfg = build_config({"data": "x", "out": "y", "preset": "mini-32", "model": {"img_dim": 64, "img_n_heads": 2}})
    mcfg = cfg.model_cfg()
    assert (mcfg.img_dim, mcfg.img_n_heads, mcfg.img_size) == (64, 2, 32)
    assert cfg.accum_steps == 1 and cfg.batch_size == 128


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"batch_sise": 8}, "batch_sise: unknown setting"),
        ({"lr": -1}, "lr: Input should be greater than 0"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"batch_size": 10, "accum_steps": 4}, "divisible by accum_steps"),
        ({"model": {"img_dim": 90}}, "img_dim (90) must be divisible"),
        ({"model": {"no_such_field": 1}}, "unknown config field(s): no_such_field"),
        ({"precision": "fp8"}, "precision"),
    ],
)
def test_invalid_values_are_one_clear_error(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"data": "x", "out": "y", **values})
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message and message.startswith("invalid training config")


def test_missing_required_setting() -> None:
    with pytest.raises(ConfigError, match="data: required setting is missing"):
        build_config({"out": "y"})


def test_toml_then_flags_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        'data = "csv:/d/captions.txt"\nout = "runs/a"\nlr = 0.002\nbatch_size = 64\n'
        '[model]\nimg_dim = 64\nimg_n_heads = 2\n',
        encoding="utf-8",
    )
    cfg = load_config(toml, {"batch_size": 32, "model": {"img_n_layers": 3}})
    assert cfg.lr == 0.002  # from the file
    assert cfg.batch_size == 32  # the flag wins
    assert cfg.model == {"img_dim": 64, "img_n_heads": 2, "img_n_layers": 3}  # tables merged key by key
    cfg.save(tmp_path / "run")
    assert load_saved_config(tmp_path / "run") == cfg


def test_unknown_toml_key_and_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x"\nout = "y"\nlearning_rate = 0.1\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate: unknown setting"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("data = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_every_field_is_a_flag() -> None:
    parser = clipforge_cli.build_parser("train")
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--batch-size", "16", "--no-tensorboard",
                              "--precision", "bf16", "--set", "img_dim=64", "--set", "img_pool=mean"])
    from training.cli import _given_overrides

    given = _given_overrides(args)
    assert given == {"data": "d", "out": "o", "batch_size": 16, "tensorboard": False, "precision": "bf16",
                     "model": {"img_dim": 64, "img_pool": "mean"}}
    for name in TrainConfig.model_fields:
        if name != "model":
            assert hasattr(args, name)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--data", "d", "--out", "OUT", "--lr", "0"], "lr: Input should be greater than 0"),
        (["train", "--data", "/no/such/data", "--out", "OUT", "--preset", "mini-32"], "does not exist"),
        (["train", "--out", "OUT", "--resume"], "not a clipforge run folder"),
        (["train", "--data", "d", "--out", "OUT", "--set", "img_dim"], "must look like key=value"),
        (["eval", "--checkpoint", "/no/such/ckpt", "--data", "d"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [a.replace("OUT", str(tmp_path / "run")) for a in argv]
    code = clipforge_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("clipforge: error: ") and fragment in err, err
    assert "\n" not in err and "Traceback" not in err


def test_saved_config_round_trips_as_json(tmp_path: Path) -> None:
    cfg = build_config({"data": "d", "out": str(tmp_path), "model": {"img_dim": 64, "img_n_heads": 2}})
    path = cfg.save(tmp_path)
    assert json.loads(path.read_text())["model"] == {"img_dim": 64, "img_n_heads": 2}


TOKENIZER_CAPTIONS = [f"a {c} {s}" for c in ("red", "Red", "blue") for s in ("circle", "Square")] * 3


def test_tokenizer_normalisation_comes_from_the_config(tmp_path: Path) -> None:
    from training.build import train_tokenizer

    base = {"data": "d", "out": "o", "preset": "mini-32", "model": {"vocab_size": 300}}
    default = train_tokenizer(build_config(base), TOKENIZER_CAPTIONS)
    assert default.decode(default.encode("A Red  Circle")[0]) == "a red circle"
    toml = tmp_path / "run.toml"
    toml.write_text('data = "d"\nout = "o"\npreset = "mini-32"\ntokenizer_lowercase = false\n'
                    "[model]\nvocab_size = 300\n", encoding="utf-8")
    cased = train_tokenizer(load_config(toml), TOKENIZER_CAPTIONS)
    assert cased.max_length == 32 and cased.vocab_size <= 300
    assert cased.decode(cased.encode("A Red  Circle")[0]) == "A Red Circle"  # case kept, whitespace still collapsed
    assert not torch.equal(cased.encode("Red"), cased.encode("red"))
    raw = train_tokenizer(load_config(toml, {"tokenizer_collapse_whitespace": False, "tokenizer_nfc": False}),
                          TOKENIZER_CAPTIONS)
    assert raw.decode(raw.encode("A Red  Circle")[0]) == "A Red  Circle"
    assert not torch.equal(raw.encode("caf\u00e9"), raw.encode("cafe\u0301"))


def test_tokenizer_flags() -> None:
    from training.cli import _given_overrides

    args = clipforge_cli.build_parser("train").parse_args(
        ["train", "--data", "d", "--out", "o", "--no-tokenizer-lowercase", "--tokenizer-nfc"])
    given = _given_overrides(args)
    assert given["tokenizer_lowercase"] is False and given["tokenizer_nfc"] is True
    assert "tokenizer_collapse_whitespace" not in given  # not given: the TOML or default value stands
    assert build_config(given).tokenizer_options() == {"lowercase": False, "nfc": True, "collapse_whitespace": True}
