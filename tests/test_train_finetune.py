"""Fine-tuning an imported transformers CLIP: tokenizer, context and preprocessing survive, the loss falls,
locked towers stay bit-identical and --unlock-last trains only the last blocks and what follows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_interop_hf import TEXTS, _hf_dir, bpe_dir  # noqa: F401  (bpe_dir is a fixture)

from clipforge_cli import main
from interop.hf import import_hf
from model import CLIP, ConfigError, ImageTransform, load_checkpoint, preset_config
from model.image import load_and_preprocess
from training.config import build_config
from training.data import generate_shapes
from training.freeze import lock_towers, tower_parts
from training.logs import read_metrics
from training.loop import train
from training.optim import build_optimizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, bpe_dir: Path) -> Path:  # noqa: F811
    """A small random transformers CLIPModel (every parameter perturbed) imported as a clipforge checkpoint."""
    tmp = tmp_path_factory.mktemp("finetune")
    _, hf_dir = _hf_dir(tmp / "hf", bpe_dir, image_size=32, patch=8, edge=36)
    import_hf(hf_dir, tmp / "imported")
    return tmp / "imported"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny generated captioned images, 40 px so the 32 px model's resize and crop really apply."""
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "s", n_train=96, n_val=0, img_size=40, n_eval=0)


def _fine_tune(ckpt: Path, data: Path, out: Path, **settings) -> Path:
    values = {"init_checkpoint": str(ckpt), "data": f"shapes:{data}", "out": str(out), "batch_size": 16, "lr": 2e-3,
              "warmup_steps": 0, "weight_decay": 0.0, "val_fraction": 0.0, "num_workers": 0, "progress": False,
              "tensorboard": False, "plots": False, "keep_checkpoints": 0, "log_every": 1, "train_augment": False,
              "threads": 1}
    values.update(settings)
    train(build_config(values))
    return out / "last"


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)[0].state_dict()


def test_fine_tuning_keeps_tokens_and_preprocessing_and_lowers_the_loss(
    imported: Path, shapes: Path, tmp_path: Path, shared_data: Path
) -> None:
    tuned = _fine_tune(imported, shapes, tmp_path / "run", epochs=8)
    base_model, base_tok, base_meta = load_checkpoint(imported)
    model, tok, meta = load_checkpoint(tuned)
    assert torch.equal(tok.encode(TEXTS), base_tok.encode(TEXTS))  # CLIP's BPE, 77 tokens, "!" padding
    assert tok.to_str() == base_tok.to_str() and tok.max_length == base_tok.max_length == 77
    kept = ("image_resize", "image_resize_size", "img_size", "image_mean", "image_std", "max_seq_len", "eps",
            "mlp_act", "vocab_size", "pad_token_id", "sot_token_id", "eot_token_id")
    assert {k: getattr(model.cfg, k) for k in kept} == {k: getattr(base_model.cfg, k) for k in kept}
    assert model.cfg.image_resize == "shortest_edge" and model.cfg.image_resize_size == 36
    photo = next((shared_data / "flickr8k-1k" / "images").glob("*.jpg"))
    pixels = [load_and_preprocess(photo, ImageTransform.for_config(m.cfg)) for m in (base_model, model)]
    assert torch.equal(pixels[0], pixels[1])
    assert meta["source"] == base_meta["source"] and meta["source"]["format"] == "hf"
    assert meta["fine_tuned_from"]["content_hash"] == base_meta["content_hash"]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r.get("kind") == "train"]
    assert len(losses) == 48
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses
    assert not torch.equal(model.state_dict()["visual.blocks.0.attn.qkv.weight"],
                           base_model.state_dict()["visual.blocks.0.attn.qkv.weight"])


def test_a_locked_image_tower_stays_bit_identical(imported: Path, shapes: Path, tmp_path: Path) -> None:
    before = _weights(imported)
    after = _weights(_fine_tune(imported, shapes, tmp_path / "run", max_steps=3, lock_image=True))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("visual.") for k in changed)
    assert {"image_proj.weight", "text_proj.weight", "logit_scale", "text.blocks.0.attn.qkv.weight",
            "text.tok_embed.weight"} <= changed


def test_unlock_last_trains_only_the_last_block_and_what_follows(imported: Path, shapes: Path, tmp_path: Path) -> None:
    before = _weights(imported)
    after = _weights(_fine_tune(imported, shapes, tmp_path / "run", max_steps=3, lock_image=True, lock_text=True,
                                unlock_last=1))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last_and_post = {k for k in before if k.startswith(("visual.blocks.1.", "text.blocks.1.", "visual.norm.",
                                                        "text.norm.", "image_proj.", "text_proj."))}
    assert changed == last_and_post | {"logit_scale"}


def test_the_lock_rule_holds_for_clipforge_towers_and_keeps_locked_towers_in_eval_mode() -> None:
    model = CLIP(preset_config("mini-32", img_n_layers=3, text_n_layers=2, text_pos="learned"))
    parts = tower_parts(model.visual)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in parts.post} == {"visual.norm.weight", "visual.norm.bias"}
    assert {"visual.cls_token", "visual.pos_embed", "visual.patch_embed.weight", "visual.norm_pre.weight"} <= {
        names[id(p)] for p in parts.stem}
    assert len(parts.blocks) == 3
    frozen = lock_towers(model, lock_image=False, lock_text=True)
    assert frozen["text"] == sum(p.numel() for p in model.text.parameters())
    model.train()
    assert model.visual.training and not model.text.training and model.text_proj.weight.requires_grad
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.text.parameters())
    with pytest.raises(ConfigError, match="exceeds the image tower's 3 blocks"):
        lock_towers(model, lock_image=True, lock_text=False, unlock_last=4)


def test_per_tower_learning_rates() -> None:
    model = CLIP(preset_config("mini-32", img_n_layers=1, text_n_layers=1))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, text_lr_scale=0.5, image_lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        towers = {names[id(p)].split(".")[0] for p in group["params"]}
        expected = {"visual": 0.1, "image_proj": 0.1, "text": 0.5, "text_proj": 0.5, "logit_scale": 1.0}
        assert {expected[t] for t in towers} == {group["lr_scale"]}, towers


@pytest.mark.parametrize(("settings", "message"), [
    ({"unlock_last": 1}, "unlock_last counts the blocks of a locked tower"),
    ({"model": {"img_dim": 64}}, "--set img_dim cannot apply"),
    ({"text_lr_scale": 0.0}, "text_lr_scale: Input should be greater than 0"),
    ({"image_lr_scale": 1.5}, "image_lr_scale: Input should be less than or equal to 1"),
])
def test_fine_tuning_settings_are_validated(imported: Path, tmp_path: Path, settings: dict, message: str) -> None:
    values = {"init_checkpoint": str(imported), "data": "shapes:x", "out": str(tmp_path), **settings}
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_the_cli_reports_a_bad_lock_in_one_line(imported: Path, shapes: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--init-checkpoint", str(imported), "--data", f"shapes:{shapes}", "--out",
                 str(tmp_path / "run"), "--lock-text", "--unlock-last", "5", "--batch-size", "16", "--num-workers",
                 "0", "--no-progress", "--no-tensorboard", "--no-plots", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "unlock_last 5 exceeds the text tower's 2 blocks" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["lock_text"] is True
