"""transformers CLIPModel import and export: embeddings equal transformers' on real photos, each file quirk handled."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from model import (
    CLIP,
    CLIPConfig,
    CLIPTokenizer,
    ConfigError,
    ImageTransform,
    load_checkpoint,
    save_checkpoint,
)
from model.errors import CheckpointError
from model.image import load_and_preprocess

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

from clipforge_cli import main
from interop.hf import import_hf
from interop.hf_export import export_hf, read_notes

TEXTS = [
    "a photo of a dog.",
    "Two CATS sleeping on a sofa!!",
    "Café crème, naïve 🐱 emoji and 123 numbers",
    "   whitespace\t\truns   and UPPERCASE   ",
    " ".join(["a very long caption"] * 40),  # truncated at 77
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip_vocab import clip_bpe, write_vocab_and_merges

    tmp = tmp_path_factory.mktemp("bpe")
    vocab, merges = clip_bpe(tmp)
    write_vocab_and_merges(tmp / "files", vocab, merges)
    return tmp / "files"


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[Path]:
    """Real photos of different sizes and aspects."""
    by_size: dict[tuple[int, int], Path] = {}
    for path in sorted((shared_data / "flickr8k-1k" / "images").glob("*.jpg")):
        with Image.open(path) as im:
            by_size.setdefault(im.size, path)
        if len(by_size) >= 6:
            break
    return list(by_size.values())


def _hf_dir(directory: Path, bpe_dir: Path, *, act: str = "quick_gelu", image_size: int = 32, patch: int = 8,
            edge: int = 36, seed: int = 0, license_card: bool = False) -> tuple[object, Path]:
    """A small random transformers CLIPModel with every parameter perturbed, saved as the hub lays it out."""
    torch.manual_seed(seed)
    common = {"hidden_act": act, "layer_norm_eps": 1e-5}
    config = transformers.CLIPConfig(
        text_config={**common, "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 80,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={**common, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": image_size, "patch_size": patch},
        projection_dim=24,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms, biases and all: a dropped one cannot pass
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))
        model.logit_scale.fill_(3.9)
    model.save_pretrained(str(directory))
    tok = transformers.CLIPTokenizer.from_pretrained(str(bpe_dir))
    tok.model_max_length = 77
    tok.save_pretrained(str(directory))
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": edge}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.45, 0.4], image_std=[0.25, 0.27, 0.3],
    ).save_pretrained(str(directory))
    if license_card:
        (directory / "README.md").write_text("---\nlicense: mit\ntags: [clip]\n---\n# a card\n", encoding="utf-8")
    return model, directory


def _hf_embeddings(model, directory: Path, texts: list[str], images: list[Path]) -> dict[str, torch.Tensor]:
    tok = transformers.CLIPTokenizer.from_pretrained(str(directory))
    proc = transformers.CLIPImageProcessor.from_pretrained(str(directory))
    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    ids = [tok(t, truncation=True, max_length=77)["input_ids"] for t in texts]
    return {"text": out.text_embeds, "image": out.image_embeds, "probs": out.logits_per_image.softmax(-1),
            "ids": ids, "scale": model.logit_scale.exp().detach()}


def _our_embeddings(ckpt: Path, texts: list[str], images: list[Path]) -> dict[str, torch.Tensor]:
    model, tok, _ = load_checkpoint(ckpt)
    transform = ImageTransform.for_config(model.cfg)
    ids = tok.encode(texts)
    pixels = torch.stack([load_and_preprocess(p, transform) for p in images])
    with torch.no_grad():
        text, image = model.encode_text(ids), model.encode_image(pixels)
        probs = model.similarity(pixels, ids)
    rows = [row[: row.index(tok.eot_id) + 1] for row in ids.tolist()]
    return {"text": text, "image": image, "probs": probs, "ids": rows, "scale": model.scale().detach()}


def _assert_same(ours: dict, theirs: dict) -> None:
    assert ours["ids"] == theirs["ids"]
    assert F.cosine_similarity(ours["text"], F.normalize(theirs["text"], dim=-1)).min() >= 0.9999
    assert F.cosine_similarity(ours["image"], F.normalize(theirs["image"], dim=-1)).min() >= 0.999
    assert torch.allclose(ours["probs"], theirs["probs"], atol=2e-3)
    assert torch.allclose(ours["scale"], theirs["scale"], rtol=1e-5)


# --------------------------------------------------------------------------- import
@pytest.mark.parametrize(("act", "image_size", "patch", "edge"), [("quick_gelu", 32, 8, 36), ("gelu", 224, 32, 224)])
def test_import_equals_transformers_on_real_photos(tmp_path: Path, bpe_dir: Path, photos: list[Path], act: str,
                                                   image_size: int, patch: int, edge: int) -> None:
    hf_model, src = _hf_dir(tmp_path / "hf", bpe_dir, act=act, image_size=image_size, patch=patch, edge=edge,
                            license_card=True)
    digest = import_hf(src, tmp_path / "ckpt")
    model, tok, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["content_hash"] == digest
    assert meta["source"] == {"format": "hf", "name_or_path": str(src), "license": "mit"}
    cfg = model.cfg
    assert (cfg.mlp_act, cfg.eps, cfg.image_resize, cfg.image_resize_size, cfg.img_size) == (
        act, 1e-5, "shortest_edge", edge, image_size)
    assert cfg.image_mean == (0.5, 0.45, 0.4) and (tok.sot_id, tok.eot_id, tok.max_length) == (49406, 49407, 77)
    _assert_same(_our_embeddings(tmp_path / "ckpt", TEXTS, photos), _hf_embeddings(hf_model, src, TEXTS, photos))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, bpe_dir: Path) -> tuple[object, Path]:
    """One random CLIPModel folder that each quirk test copies and rewrites."""
    return _hf_dir(tmp_path_factory.mktemp("reference") / "hf", bpe_dir, seed=3)


def _copy(tmp_path: Path, reference: tuple[object, Path]) -> tuple[object, Path]:
    model, directory = reference
    shutil.copytree(directory, tmp_path / "hf")
    return copy.deepcopy(model), tmp_path / "hf"


def _check_import(tmp_path: Path, src: Path, reference, photos: list[Path]) -> None:
    import_hf(src, tmp_path / "ckpt")
    _assert_same(_our_embeddings(tmp_path / "ckpt", TEXTS, photos),
                 _hf_embeddings(reference, tmp_path / "hf", TEXTS, photos))


def test_fp16_weights(tmp_path: Path, reference: tuple, photos: list[Path]) -> None:
    reference, src = _copy(tmp_path, reference)
    state = {k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():  # the reference: the same fp16-rounded weights
        for p in reference.parameters():
            p.copy_(p.half().float())
    _check_import(tmp_path, src, reference, photos)
    model, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_position_ids_buffer_of_older_checkpoints(tmp_path: Path, reference: tuple, photos: list[Path]) -> None:
    reference, src = _copy(tmp_path, reference)
    state = load_file(str(src / "model.safetensors"))
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    state["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    _check_import(tmp_path, src, reference, photos)
    state["text_model.embeddings.position_ids"] = torch.arange(77).flip(0).unsqueeze(0)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not 0..76"):
        import_hf(src, tmp_path / "other")


def test_sharded_safetensors_with_index(tmp_path: Path, bpe_dir: Path, reference: tuple, photos: list[Path]) -> None:
    reference, src = _copy(tmp_path, reference)
    shutil.rmtree(src)
    reference.save_pretrained(str(src), max_shard_size="1MB")
    _hf_dir_files(bpe_dir, src)
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    assert len(list(src.glob("model-*.safetensors"))) > 1
    _check_import(tmp_path, src, reference, photos)


def _hf_dir_files(bpe_dir: Path, src: Path) -> None:
    """Tokenizer and preprocessor files of _hf_dir's defaults, for a folder whose weights were rewritten."""
    tok = transformers.CLIPTokenizer.from_pretrained(str(bpe_dir))
    tok.model_max_length = 77
    tok.save_pretrained(str(src))
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                       image_mean=[0.5, 0.45, 0.4], image_std=[0.25, 0.27, 0.3]).save_pretrained(str(src))


def test_pytorch_model_bin_is_read_as_weights_only(tmp_path: Path, reference: tuple, photos: list[Path]) -> None:
    reference, src = _copy(tmp_path, reference)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    _check_import(tmp_path, src, reference, photos)


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path: Path, reference: tuple, capsys: pytest.CaptureFixture) -> None:
    _, src = _copy(tmp_path, reference)
    state = dict(load_file(str(src / "model.safetensors")))
    (src / "model.safetensors").unlink()
    torch.save({**state, "evil": _Payload()}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only tensors are loaded"):
        import_hf(src, tmp_path / "ckpt")
    assert "must never run" not in capsys.readouterr().out


def test_tokenizer_given_as_vocab_and_merges_only(tmp_path: Path, bpe_dir: Path, reference: tuple,
                                                  photos: list[Path]) -> None:
    reference, src = _copy(tmp_path, reference)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    shutil.copy(bpe_dir / "vocab.json", src / "vocab.json")
    shutil.copy(bpe_dir / "merges.txt", src / "merges.txt")
    import_hf(src, tmp_path / "ckpt")
    ours = _our_embeddings(tmp_path / "ckpt", TEXTS, photos)
    # the reference reads the same two files
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    _assert_same(ours, _hf_embeddings(reference, src, TEXTS, photos))


def test_legacy_eos_token_id_2_pools_at_the_largest_id(tmp_path: Path, reference: tuple, photos: list[Path]) -> None:
    reference, src = _copy(tmp_path, reference)
    raw = json.loads((src / "config.json").read_text())
    raw["text_config"]["eos_token_id"] = 2
    (src / "config.json").write_text(json.dumps(raw))
    reference = transformers.CLIPModel.from_pretrained(str(src)).eval()  # argmax pooling
    _check_import(tmp_path, src, reference, photos)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("model_type", ["siglip", "chinese_clip", "clip_vision_model"])
def test_other_model_types_are_refused_naming_what_is_supported(tmp_path: Path, model_type: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    with pytest.raises(ConfigError) as info:
        import_hf(tmp_path, tmp_path / "ckpt")
    message = str(info.value)
    assert f"model_type {model_type!r}" in message and "supported: transformers CLIPModel" in message
    assert "\n" not in message


def test_folders_that_are_no_supported_layout_say_what_was_found(tmp_path: Path, reference: tuple) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no config.json; found weights.npz; expected config.json \(CLIPModel\)"):
        import_hf(tmp_path / "a", tmp_path / "ckpt")
    (tmp_path / "a" / "open_clip_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="open_clip layout: import it as open_clip:DIR"):
        import_hf(tmp_path / "a", tmp_path / "ckpt")
    _, src = _copy(tmp_path, reference)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights; found config.json"):
        import_hf(src, tmp_path / "ckpt")


# --------------------------------------------------------------------------- export
def test_export_loads_in_transformers_with_the_same_embeddings(tmp_path: Path, bpe_dir: Path,
                                                              photos: list[Path]) -> None:
    _, src = _hf_dir(tmp_path / "hf", bpe_dir, act="gelu", seed=5)
    import_hf(src, tmp_path / "imported")
    model, tok, meta = load_checkpoint(tmp_path / "imported")
    with torch.no_grad():  # a patch bias transformers does not have must travel (folded into positions)
        model.visual.patch_embed.bias.normal_(std=0.3)
    save_checkpoint(tmp_path / "ckpt", model, tok, meta={"source": meta["source"]})
    assert main(["model", "export", str(tmp_path / "ckpt"), "--to", f"hf:{tmp_path / 'out'}"]) == 0
    exported = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    theirs = _hf_embeddings(exported, tmp_path / "out", TEXTS, photos)
    ours = _our_embeddings(tmp_path / "ckpt", TEXTS, photos)
    _assert_same(ours, theirs)
    assert torch.allclose(ours["image"], F.normalize(theirs["image"], dim=-1), atol=1e-5)
    # and back again: the exported folder imports to the same model
    assert main(["model", "import", f"hf:{tmp_path / 'out'}", "--out", str(tmp_path / "again")]) == 0
    _assert_same(_our_embeddings(tmp_path / "again", TEXTS, photos), theirs)


def _save_native(directory: Path, bpe_dir: Path | None, *, cleaning: str = "none", **changes) -> Path:
    base = {"img_size": 32, "patch_size": 8, "img_dim": 32, "img_n_heads": 4, "img_n_layers": 1,
            "text_dim": 32, "text_n_heads": 4, "text_n_kv_heads": 4, "text_n_layers": 1, "align_dim": 16,
            "text_pos": "learned", "max_seq_len": 77}
    if bpe_dir is not None:
        vocab = json.loads((bpe_dir / "vocab.json").read_text("utf-8"))
        merges = (bpe_dir / "merges.txt").read_text("utf-8").splitlines()
        tok = CLIPTokenizer.from_clip_bpe(vocab, merges).with_cleaning(cleaning)
        base.update(vocab_size=49408, pad_token_id=0, sot_token_id=49406, eot_token_id=49407)
    else:
        tok = CLIPTokenizer.train(["a red circle", "a blue square"] * 5, vocab_size=300, max_length=32)
        base.update(vocab_size=300, max_seq_len=32)
    save_checkpoint(directory, CLIP(CLIPConfig(**{**base, **changes})), tok)
    return directory


def test_a_native_model_with_clip_bpe_exports(tmp_path: Path, bpe_dir: Path) -> None:
    ckpt = _save_native(tmp_path / "ckpt", bpe_dir)
    export_hf(ckpt, tmp_path / "out")
    exported = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    square = [Image.new("RGB", (64, 64), (200, 30, 90))]  # crop_box and shortest_edge agree on squares
    proc = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path / "out"))
    model, _, _ = load_checkpoint(ckpt)
    ours = torch.stack([ImageTransform.for_config(model.cfg)(im) for im in square])
    assert torch.allclose(ours, proc(images=square, return_tensors="pt")["pixel_values"], atol=1e-5)
    with torch.no_grad():
        theirs = exported(pixel_values=ours, input_ids=torch.tensor([[49406, 320, 49407]])).image_embeds
        assert torch.allclose(model.encode_image(ours), F.normalize(theirs, dim=-1), atol=1e-5)
    assert read_notes(tmp_path / "out") == []  # transformers reproduces all of it


def test_open_clips_crop_offset_and_cleaning_export_and_the_export_says_what_differs(
        tmp_path: Path, bpe_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """An open_clip import exports (its weights exactly); transformers' processor and tokenizer really do differ
    on the two choices, and the folder and the CLI name both."""
    ckpt = _save_native(tmp_path / "ckpt", bpe_dir, cleaning="open_clip", image_resize="shortest_edge",
                        image_crop_offset="round")
    assert main(["model", "export", str(ckpt), "--to", f"hf:{tmp_path / 'out'}"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipforge: note: ")]
    assert len(notes) == 2
    assert "transformers will not reproduce image_crop_offset 'round'" in notes[0]
    assert "transformers will not reproduce tokenizer cleaning 'open_clip'" in notes[1]
    assert [n.split(":")[0] for n in read_notes(tmp_path / "out")] == ["image_crop_offset 'round'",
                                                                       "tokenizer cleaning 'open_clip'"]
    model, tok, _ = load_checkpoint(ckpt)
    odd_margin = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 47, 3), dtype=np.uint8))
    proc = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path / "out"))
    theirs = proc(images=[odd_margin], return_tensors="pt")["pixel_values"][0]
    floor = ImageTransform.for_config(model.cfg.replace(image_crop_offset="floor"))(odd_margin)
    assert torch.allclose(theirs, floor, atol=1e-5)
    assert not torch.allclose(theirs, ImageTransform.for_config(model.cfg)(odd_margin), atol=1e-2)
    their_tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = tok.encode("Tom &amp; Jerry")[0].tolist()
    assert ours[: ours.index(tok.eot_id) + 1] == their_tok("tom & jerry")["input_ids"]
    assert their_tok("Tom &amp; Jerry")["input_ids"] != their_tok("tom & jerry")["input_ids"]


@pytest.mark.parametrize(("changes", "field"), [
    ({"text_pos": "rope"}, "text_pos 'rope'"),
    ({"text_n_kv_heads": 2}, "text_n_kv_heads 2"),
    ({"img_color_layer": 0}, "img_color_layer"),
    ({"img_stem": "conv"}, "img_stem 'conv'"),
    ({"img_pool": "mean"}, "img_pool 'mean'"),
])
def test_export_refuses_what_transformers_cannot_express(tmp_path: Path, bpe_dir: Path, changes: dict,
                                                         field: str, capsys: pytest.CaptureFixture) -> None:
    ckpt = _save_native(tmp_path / "ckpt", bpe_dir, **changes)
    assert main(["model", "export", str(ckpt), "--to", f"hf:{tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge: error: cannot export to transformers: " + field) and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_trained_tokenizer(tmp_path: Path) -> None:
    ckpt = _save_native(tmp_path / "ckpt", None)
    with pytest.raises(ConfigError, match="tokenizer: transformers' CLIPTokenizer rebuilds CLIP's BPE"):
        export_hf(ckpt, tmp_path / "out")


def test_cli_import_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["model", "import", f"hf:{tmp_path / 'missing'}", "--out", str(tmp_path / "c")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["model", "import", "somewhere", "--out", str(tmp_path / "c")]) == 2
    assert "SRC must be hf:PATH or open_clip:PATH" in capsys.readouterr().err
    assert main(["model", "import", f"hf:{tmp_path}", "--arch", "ViT-B-32", "--out", str(tmp_path / "c")]) == 2
    assert "--arch applies to open_clip" in capsys.readouterr().err
