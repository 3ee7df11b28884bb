"""ONNX export: the graphs equal the torch model under onnxruntime for every architecture option, the
side files describe the model, the runtime wrapper matches CLIPInference, and bad input is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from clip_vocab import clip_bpe

from interop.onnx_export import (
    CONFIG,
    TEXTUAL,
    TOKENIZER,
    VISUAL,
    _check,
    _stage_directory,
    export_onnx,
)
from interop.onnx_runtime import OnnxEncoder
from model import (
    CLIP,
    CLIPInference,
    CLIPTokenizer,
    preset_config,
    read_meta,
    save_checkpoint,
)
from model.errors import ClipforgeError

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green", "big") for s in ("circle", "square", "triangle")] * 4
PROBES = ["a red circle", "a big blue square next to a green triangle and a red circle", "green"]
TINY = {"img_size": 16, "patch_size": 4, "img_dim": 32, "img_n_heads": 4, "img_n_layers": 2, "text_dim": 32,
        "text_n_heads": 4, "text_n_layers": 2, "align_dim": 16, "max_seq_len": 16}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # rotary positions, grouped-query attention (2 kv heads for 4), convolutional stem, colour split, CLS pooling
    "mini-32-rope-gqa-conv-colour": ("mini-32", {**TINY, "text_n_kv_heads": 2, "img_stem": "conv",
                                                 "img_color_layer": 1, "img_pool": "cls"}),
    # learned text positions, plain multi-head attention, patch stem, mean pooling, the math attention path,
    # CLIP's QuickGELU, layer-norm eps and 49,408-token BPE ("!" padding) with open_clip's text cleaning,
    # the shortest-edge resize with open_clip's rounded crop offset
    "vit-b-16-learned-mha-mean-quickgelu-clipbpe": ("vit-b-16", {
        **TINY, "text_n_kv_heads": 4, "img_pool": "mean", "use_sdpa": False, "mlp_act": "quick_gelu", "eps": 1e-5,
        "image_resize": "shortest_edge", "image_resize_size": 18, "image_crop_offset": "round", "pad_token_id": 0,
        "sot_token_id": 49406, "eot_token_id": 49407}),
}


def _tokenizer(cfg: Any, tmp_dir: Path) -> CLIPTokenizer:
    """CLIP's own BPE where the config numbers its special tokens as CLIP does, else one trained on captions."""
    if cfg.eot_token_id == 49407:
        tok = CLIPTokenizer.from_clip_bpe(*clip_bpe(tmp_dir), max_length=cfg.max_seq_len)
        return tok.with_cleaning("open_clip") if cfg.image_crop_offset == "round" else tok
    return CLIPTokenizer.train(CAPTIONS, vocab_size=400, max_length=cfg.max_seq_len)


def _perturbed(model: CLIP, seed: int) -> CLIP:
    """Every parameter moved off its init (zero biases, unit norms), so a graph that drops one cannot match."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    preset, overrides = VARIANTS[request.param]
    torch.manual_seed(0)
    cfg = preset_config(preset, **overrides)
    root = tmp_path_factory.mktemp(request.param)
    tok = _tokenizer(cfg, root)
    model = _perturbed(CLIP(cfg), seed=1)
    save_checkpoint(root / "ckpt", model, tok, {"step": 3, "class_names": ["circle", "square"]})
    files = export_onnx(root / "ckpt", root / "onnx")
    return {"ckpt": root / "ckpt", "out": root / "onnx", "files": files, "model": model, "tok": tok, "cfg": cfg}


def _pixels(cfg: Any, batch: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, cfg.channel, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    assert a.shape == tuple(b.shape)
    return float(np.abs(a - b.numpy()).max())


def test_export_writes_both_graphs_tokenizer_and_config(exported: dict[str, Any]) -> None:
    out, cfg, model = exported["out"], exported["cfg"], exported["model"]
    assert sorted(p.name for p in exported["files"]) == sorted([CONFIG, TEXTUAL, TOKENIZER, VISUAL])
    assert all(p.is_file() for p in exported["files"])
    config = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    assert config["content_hash"] == read_meta(exported["ckpt"])["content_hash"]
    assert config["logit_scale"] == pytest.approx(float(model.scale().detach()), rel=1e-6)
    assert config["normalized"] is True and config["embed_dim"] == cfg.align_dim
    pre = config["preprocess"]
    assert pre["size"] == [cfg.img_size, cfg.img_size]
    assert pre["mean"] == pytest.approx(list(cfg.image_mean)) and pre["std"] == pytest.approx(list(cfg.image_std))
    assert (pre["interpolation"], pre["resize_mode"], pre["crop"]) == ("bicubic", "shortest", "center")
    assert (pre["clipforge_resize"], pre["resize_size"]) == (cfg.image_resize, cfg.image_resize_size or cfg.img_size)
    assert pre["clipforge_crop_offset"] == cfg.image_crop_offset
    assert config["tokenizer"]["context_length"] == cfg.max_seq_len
    # read back from the checkpoint's tokenizer file: the variant with the rounded offset cleans as open_clip does
    assert config["tokenizer"]["cleaning"] == ("open_clip" if cfg.image_crop_offset == "round" else "none")
    assert config["class_names"] == ["circle", "square"]


def test_graphs_declare_a_dynamic_batch_and_context(exported: dict[str, Any]) -> None:
    cfg = exported["cfg"]

    def dims(path: Path) -> list[Any]:
        (inp,) = onnx.load(str(path), load_external_data=False).graph.input
        return [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]

    visual, textual = dims(exported["out"] / VISUAL), dims(exported["out"] / TEXTUAL)
    assert isinstance(visual[0], str) and visual[1:] == [cfg.channel, cfg.img_size, cfg.img_size]
    assert isinstance(textual[0], str) and isinstance(textual[1], str)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_the_torch_model(exported: dict[str, Any], batch: int) -> None:
    out, model, tok, cfg = exported["out"], exported["model"], exported["tok"], exported["cfg"]
    visual = ort.InferenceSession(str(out / VISUAL), providers=["CPUExecutionProvider"])
    textual = ort.InferenceSession(str(out / TEXTUAL), providers=["CPUExecutionProvider"])
    pixels = _pixels(cfg, batch)
    longest = tok.encode(PROBES[:batch])
    full = torch.nn.functional.pad(longest, (0, cfg.max_seq_len - longest.shape[1]), value=cfg.pad_token_id)
    with torch.no_grad():
        img_ref, txt_ref = model.encode_image(pixels), model.encode_text(longest)
    assert _max_diff(visual.run(None, {"pixel_values": pixels.numpy()})[0], img_ref) <= 1e-4
    for ids in (longest, full):  # padded to the longest caption or to the whole context: the same embeddings
        assert _max_diff(textual.run(None, {"input_ids": ids.numpy()})[0], txt_ref) <= 1e-4
    # A row cut off before its end-of-text token pools at its last real token, in both.
    cut = longest.clone()
    cut[:, -1] = torch.randint(3, 259, (batch,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cut_ref = model.encode_text(cut)
    assert _max_diff(textual.run(None, {"input_ids": cut.numpy()})[0], cut_ref) <= 1e-4


def test_the_tokenizer_file_gives_clipforge_ids(exported: dict[str, Any]) -> None:
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(exported["out"] / TOKENIZER))
    ids = [e.ids for e in plain.encode_batch(PROBES)]
    assert torch.equal(torch.tensor(ids), exported["tok"].encode(PROBES))


def test_onnx_encoder_matches_clip_inference(exported: dict[str, Any]) -> None:
    cfg = exported["cfg"]
    encoder = OnnxEncoder(exported["out"], threads=1)
    clip = CLIPInference(exported["model"], exported["tok"], read_meta(exported["ckpt"]))
    assert encoder.model_id == clip.model_id and encoder.dim == clip.dim
    assert encoder.logit_scale == pytest.approx(clip.logit_scale, rel=1e-6)
    pixels = _pixels(cfg, 3, seed=5)
    assert np.abs(encoder.encode_images(pixels) - clip.embed_pixels(pixels)).max() <= 1e-4
    ids = exported["tok"].encode(PROBES)
    full = torch.nn.functional.pad(ids, (0, cfg.max_seq_len - ids.shape[1]), value=cfg.pad_token_id)
    assert np.abs(encoder.encode_texts(full.numpy()) - clip.embed_texts(PROBES)).max() <= 1e-4
    assert encoder.encode_images(pixels[:0]).shape == (0, cfg.align_dim)
    assert encoder.encode_texts(ids[:0]).shape == (0, cfg.align_dim)


def test_onnx_encoder_refuses_bad_inputs(exported: dict[str, Any], tmp_path: Path) -> None:
    cfg = exported["cfg"]
    encoder = OnnxEncoder(exported["out"])
    with pytest.raises(ClipforgeError, match="pixels must have shape"):
        encoder.encode_images(torch.zeros(1, cfg.channel, cfg.img_size + 4, cfg.img_size))
    with pytest.raises(ClipforgeError, match="token ids must have shape"):
        encoder.encode_texts(torch.ones(1, cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ClipforgeError, match="must lie in"):
        encoder.encode_texts(torch.tensor([[cfg.sot_token_id, cfg.vocab_size, cfg.eot_token_id]]))
    with pytest.raises(ClipforgeError, match="not a clipforge ONNX export"):
        OnnxEncoder(tmp_path)
    with pytest.raises(ClipforgeError, match="threads"):
        OnnxEncoder(exported["out"], threads=0)


def test_export_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(ClipforgeError, match="checkpoint"):
            export_onnx(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no output, no staging folder left behind


def test_export_refuses_an_unwritable_or_foreign_out_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ClipforgeError, match="is not a directory"):
        _stage_directory(blocker)
    with pytest.raises(ClipforgeError, match="cannot write the ONNX export"):
        _stage_directory(blocker / "onnx")  # its parent is a file: nothing can be created there
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not yours")
    with pytest.raises(ClipforgeError, match="not empty"):
        _stage_directory(foreign)
    assert (foreign / "cat.jpg").read_bytes() == b"not yours"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / CONFIG).write_text("{}")
    assert _stage_directory(earlier).parent == tmp_path  # an earlier export may be replaced


def test_export_end_to_end_errors_are_clipforge_errors(exported: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ClipforgeError, match="cannot write the ONNX export"):
        export_onnx(exported["ckpt"], blocker / "onnx")


def test_a_graph_that_differs_from_torch_is_refused(exported: dict[str, Any]) -> None:
    cfg = exported["cfg"]
    pixels = _pixels(cfg, 2)
    with torch.no_grad():
        ref = exported["model"].encode_image(pixels)
    assert _check(ort, exported["out"] / VISUAL, "pixel_values", [pixels], [ref]) <= 1e-4
    with pytest.raises(ClipforgeError, match="differs from the torch model"):
        _check(ort, exported["out"] / VISUAL, "pixel_values", [pixels], [ref + 1e-3])
