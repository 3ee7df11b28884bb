"""`model import open_clip:PATH` against the real open_clip: the same weights, photos and texts give the same outputs.

The reference runs in .venv-openclip (`make reference-venv`: open_clip 3.3.0 with its own torch and
torchvision, which cannot import beside ours); tests/openclip_reference.py builds perturbed random
open_clip models, saves them in each layout and writes open_clip's own embeddings and token ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from interop.open_clip import convert_to_hf, import_open_clip
from interop.open_clip_archs import ARCHS, CONFIG_NAME, OpenClipError
from interop.open_clip_mapping import expected_shapes, hf_state_dict
from interop.open_clip_source import read_source
from interop.open_clip_tokenizer import write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_VENV = ROOT / ".venv-openclip"
REFERENCE_PY = REFERENCE_VENV / "bin" / "python"
WHEEL = ROOT / ".cache" / "wheels" / "open_clip_torch-3.3.0-py3-none-any.whl"
# Photos of different sizes and aspects; the 500x334 and 200x132 ones need open_clip's own centre-crop offset
# (torchvision rounds half the margin, transformers floors it) at 64 px and at 224 px.
PHOTOS = (
    "1034276567_49bb87c51c.jpg",  # 200x132
    "1805990081_da9cefe3a5.jpg",  # 500x334
    "1016887272_03199f49c4.jpg",  # 133x200
    "1716445442_9cf3528342.jpg",  # 500x375
    "1057251835_6ded4ada9c.jpg",  # 200x200
    "1022975728_75515238d8.jpg",  # 200x112
    "172092461_a9a9762e13.jpg",  # 375x500
)
TEXTS = [
    "a dog running on the beach",
    "A DOG Running   on the\tBEACH!!",
    "Tom &amp; Jerry &lt;3",
    "café crème brûlée, naïve",
    "東京の夜景 🌃🐶",
    "it's 3:45pm, we're 100% sure they'll've gone",
    "donâ€™t ﬁne",
    "ÀÉÎÕÜ İSTANBUL straße ǅ",
    "“curly” ‘quotes’, ＦＵＬＬ ｗｉｄｔｈ and ﬀ",
    "&nbsp;&#39;&#x27;&quot; a\u00a0b",
    "",
    "a photo of " + "a very long caption " * 30,
]
SMALL = ("hub_safetensors", "hub_bin_fp16", "openai_jit")


def _reference_unavailable() -> str | None:
    if REFERENCE_PY.exists() and (REFERENCE_VENV / ".installed").exists():
        return None
    why = REFERENCE_VENV / "UNAVAILABLE"
    if why.is_file():
        return f"open_clip reference environment could not be built: {why.read_text(encoding='utf-8').strip()}"
    return f"open_clip reference environment missing at {REFERENCE_VENV}: run `make reference-venv`"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    """Run open_clip once: the saved models, its outputs and the manifest."""
    reason = _reference_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("openclip_reference")
    texts = out / "texts.json"
    texts.write_text(json.dumps(TEXTS), encoding="utf-8")
    images = [str(shared_data / "flickr8k-1k" / "images" / name) for name in PHOTOS]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(REFERENCE_PY), str(ROOT / "tests" / "openclip_reference.py"), str(out), "--images", *images,
         "--texts", str(texts), "--standard", "ViT-B-32"],
        check=False, capture_output=True, text=True, timeout=900, env={**env, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["open_clip"] == "3.3.0"
    return {"dir": out, "npz": dict(np.load(out / "reference.npz")), "variants": manifest["variants"], "images": images}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _probs(scale: float, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    logits = scale * image @ text.T
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def _check_against_open_clip(reference: dict, name: str, tmp_path: Path) -> None:
    from model import CLIPInference
    from model.checkpoint import read_meta

    info, ref = reference["variants"][name], reference["npz"]
    ckpt = tmp_path / "ckpt"
    digest = import_open_clip(reference["dir"] / info["path"], ckpt, arch=info.get("arch"))
    clip = CLIPInference.load(ckpt)
    source = read_meta(ckpt)["source"]
    assert isinstance(digest, str) and source["format"] == "open_clip"
    assert source["name_or_path"] == str(reference["dir"] / info["path"])

    # Every criterion is measured before any is asserted, so one run reports all that differ.
    problems = []
    ids = clip.tokenizer.encode(TEXTS).numpy()
    assert ids.shape == ref["tokens"].shape
    differ = [t for t, a, b in zip(TEXTS, ids, ref["tokens"]) if (a != b).any()]
    if differ:
        problems.append(f"token ids differ from open_clip's for {differ}")
    text = clip.embed_texts(TEXTS)
    image = clip.embed_images(reference["images"])
    text_cos, image_cos = _cos(text, ref[f"{name}/text"]), _cos(image, ref[f"{name}/image"])
    low_text = {t[:40]: round(float(c), 5) for t, c in zip(TEXTS, text_cos) if c < 0.9999}
    if low_text:
        problems.append(f"text cosine below 0.9999: {low_text}")
    low_image = {p: round(float(c), 5) for p, c in zip(PHOTOS, image_cos) if c < 0.999}
    if low_image:
        problems.append(f"image cosine below 0.999: {low_image}")
    scale = float(ref[f"{name}/logit_scale"])
    if abs(clip.logit_scale - scale) > 1e-5 * scale:
        problems.append(f"temperature: logit scale {clip.logit_scale} against open_clip's {scale}")
    gap = np.abs(_probs(clip.logit_scale, image, text) - _probs(scale, ref[f"{name}/image"], ref[f"{name}/text"])).max()
    if gap > 2e-3:
        problems.append(f"similarity probabilities differ by up to {gap:.4f}")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("name", SMALL)
def test_import_matches_open_clip(reference: dict, name: str, tmp_path: Path) -> None:
    """Hub safetensors (own mean/std, licence), fp16 .bin with state_dict wrapper and module. prefix, TorchScript.

    Through CLIPInference from the photo files: the import carries open_clip's rounded crop offset
    (image_crop_offset "round") and its text cleaning (the tokenizer's cleaning "open_clip").
    """
    _check_against_open_clip(reference, name, tmp_path)


@pytest.mark.slow
def test_import_bare_vit_b_32_with_arch(reference: dict, tmp_path: Path) -> None:
    """A full ViT-B-32 bare state dict through --arch ViT-B-32."""
    _check_against_open_clip(reference, "bare", tmp_path)


def test_onnx_export_of_an_import_matches_open_clip(reference: dict, tmp_path: Path) -> None:
    """The ONNX folder alone reproduces open_clip: pixels made as its clipforge_onnx.json says (the rounded
    crop offset), ids from its tokenizer.json after the cleaning it names, the graphs under onnxruntime."""
    pytest.importorskip("onnxruntime")
    from tokenizers import Tokenizer

    from interop.onnx_export import CONFIG, TOKENIZER, export_onnx
    from interop.onnx_runtime import OnnxEncoder
    from model import ImageTransform, load_and_preprocess
    from model.tokenizer import open_clip_clean

    name = "hub_safetensors"  # its own mean and std, the 64 px size where the 500x334 photo's margin is odd
    info, ref = reference["variants"][name], reference["npz"]
    import_open_clip(reference["dir"] / info["path"], tmp_path / "ckpt", arch=info.get("arch"))
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    config = json.loads((tmp_path / "onnx" / CONFIG).read_text(encoding="utf-8"))
    pre, tok = config["preprocess"], config["tokenizer"]
    assert (pre["clipforge_crop_offset"], tok["cleaning"]) == ("round", "open_clip")
    transform = ImageTransform(pre["size"][0], pre["mean"], pre["std"], resize=pre["clipforge_resize"],
                               resize_size=pre["resize_size"], crop_offset=pre["clipforge_crop_offset"])
    pixels = torch.stack([load_and_preprocess(p, transform) for p in reference["images"]])
    plain = Tokenizer.from_file(str(tmp_path / "onnx" / TOKENIZER))
    ids = np.array([e.ids for e in plain.encode_batch([open_clip_clean(t) for t in TEXTS])])
    assert ids.shape == ref["tokens"].shape and (ids == ref["tokens"]).all()
    encoder = OnnxEncoder(tmp_path / "onnx", threads=1)
    assert _cos(encoder.encode_texts(ids), ref[f"{name}/text"]).min() >= 0.9999
    assert _cos(encoder.encode_images(pixels), ref[f"{name}/image"]).min() >= 0.999
    assert encoder.logit_scale == pytest.approx(float(ref[f"{name}/logit_scale"]), rel=1e-5)


def test_licence_comes_from_the_model_card(reference: dict, tmp_path: Path) -> None:
    provenance = convert_to_hf(reference["dir"] / "hub_safetensors", tmp_path / "hf")
    assert provenance == {"format": "open_clip", "name_or_path": str(reference["dir"] / "hub_safetensors"),
                          "arch": None, "license": "mit"}


@pytest.mark.parametrize("name", SMALL)
def test_converted_folder_is_exact_in_transformers(reference: dict, name: str, tmp_path: Path) -> None:
    """The mapping alone, on open_clip's own pixels and ids; a dropped norm bias is caught at these tolerances."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    info, ref = reference["variants"][name], reference["npz"]
    convert_to_hf(reference["dir"] / info["path"], tmp_path, arch=info.get("arch"))
    model = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()

    def features(out: object) -> np.ndarray:
        return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()

    pixels = torch.from_numpy(ref[f"{name}/pixels"])
    with torch.no_grad():
        text = features(model.get_text_features(input_ids=torch.from_numpy(ref["tokens"])))
        image = features(model.get_image_features(pixel_values=pixels))
        assert _cos(text, ref[f"{name}/text"]).min() >= 0.99999
        assert _cos(image, ref[f"{name}/image"]).min() >= 0.99999
        assert float(model.logit_scale.exp()) == pytest.approx(float(ref[f"{name}/logit_scale"]), rel=1e-5)
        model.vision_model.post_layernorm.bias.zero_()  # as if ln_post's bias had been dropped
        dropped = features(model.get_image_features(pixel_values=pixels))
    assert _cos(dropped, ref[f"{name}/image"]).min() < 0.999


# ------------------------------------------------------------------ formats, quirks and refusals (no reference needed)


def _small_state(cfg: dict) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s) if s else torch.tensor(2.0) for k, s in expected_shapes(cfg).items()}


SMALL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _hub(tmp_path: Path, model_cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}), encoding="utf-8")
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def test_arch_table_matches_open_clips_own_configs() -> None:
    if not WHEEL.is_file():
        pytest.skip(f"open_clip's wheel not at {WHEEL} (make install downloads it)")
    with zipfile.ZipFile(WHEEL) as wheel:
        for name, cfg in ARCHS.items():
            theirs = json.loads(wheel.read(f"open_clip/model_configs/{name}.json"))
            assert cfg == theirs, name
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu",
            "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu"} <= set(ARCHS)


def test_training_checkpoint_quirks_unwrap(tmp_path: Path) -> None:
    """{'state_dict': {'module.…': fp16}} as open_clip's trainer saves it reads as the plain state dict."""
    state = _small_state(SMALL_CFG)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v.half() for k, v in state.items()}}, path)
    source = read_source(path, arch="ViT-B-32")
    assert set(source.state_dict) == set(state)
    assert all(v.dtype == torch.float16 for v in source.state_dict.values())
    mapped = hf_state_dict(source.state_dict, SMALL_CFG)
    assert all(v.dtype == torch.float32 for v in mapped.values())
    q, k, v = (mapped[f"text_model.encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), state["transformer.resblocks.0.attn.in_proj_weight"].half().float())
    assert torch.equal(mapped["visual_projection.weight"], state["visual.proj"].half().float().t())


def test_wrong_arch_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    torch.save(_small_state(SMALL_CFG), path)
    with pytest.raises(OpenClipError, match=r"do not match ViT-B-32: .* missing"):
        convert_to_hf(path, tmp_path / "out", arch="ViT-B-32")


def test_bare_file_needs_arch(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    torch.save(_small_state(SMALL_CFG), path)
    with pytest.raises(OpenClipError, match="give --arch NAME"):
        read_source(path)
    with pytest.raises(OpenClipError, match="not a supported open_clip config"):
        read_source(path, arch="RN50")


class _Payload:
    def __reduce__(self):  # what a malicious pickle would run on load
        return (os.system, (f"touch {self.marker}",))

    def __init__(self, marker: Path) -> None:
        self.marker = marker


def test_pickles_never_execute(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"visual.proj": torch.zeros(2, 2), "x": _Payload(marker)}, path)
    with pytest.raises(OpenClipError, match=r"weights_only=True"):
        read_source(path, arch="ViT-B-32")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("extra_keys", "expected"),
    [
        ({"visual.layer1.0.conv1.weight": (64, 64, 1, 1)}, "ResNet image tower"),
        ({"visual.trunk.patch_embed.proj.weight": (8, 3, 16, 16)}, "timm image tower"),
        ({"logit_bias": ()}, "SigLIP"),
        ({"text_decoder.resblocks.0.ln_1.weight": (8,)}, "CoCa"),
    ],
)
def test_unmapped_weights_are_refused_in_one_line(tmp_path: Path, extra_keys: dict, expected: str) -> None:
    state = _small_state(SMALL_CFG)
    state.update({k: torch.zeros(s) for k, s in extra_keys.items()})
    path = tmp_path / "w.bin"
    torch.save(state, path)
    with pytest.raises(OpenClipError, match=expected) as err:
        read_source(path, arch="ViT-B-32")
    assert "supported:" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}, "ResNet"),
        ({"init_logit_bias": -10}, "SigLIP"),
        ({"multimodal_cfg": {"layers": 12}}, "CoCa"),
        ({"vision_cfg": {"timm_model_name": "convnext_base"}}, "timm"),
        ({"text_cfg": {"hf_model_name": "roberta-base"}}, "Hugging Face text tower"),
        ({"custom_text": True}, "custom text tower"),
        ({"vision_cfg": {"ls_init_value": 1e-5}}, "layer scale"),
        ({"text_cfg": {"pool_type": "last"}}, "text pooling"),
        ({"text_cfg": {"tokenizer_kwargs": {"clean": "canonicalize"}}}, "tokenizer arguments"),
        ({"text_cfg": {"tokenizer_kwargs": {"reduction_mask": "simple"}}}, "tokenizer arguments"),
    ],
)
def test_unmapped_configs_are_refused_in_one_line(tmp_path: Path, change: dict, expected: str) -> None:
    cfg = json.loads(json.dumps(SMALL_CFG))
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    folder = _hub(tmp_path, cfg, _small_state(SMALL_CFG))
    with pytest.raises(OpenClipError, match=expected) as err:
        convert_to_hf(folder, tmp_path / "out")
    assert "supported:" in str(err.value) and "\n" not in str(err.value)


def test_other_layouts_say_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(OpenClipError, match=r"found config.json \(a transformers folder: use hf:DIR\); expected"):
        read_source(tmp_path)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not weights", encoding="utf-8")
    with pytest.raises(OpenClipError, match="expected open_clip's safetensors or .bin"):
        read_source(text_file, arch="ViT-B-32")
    torch.save({"model": [1, 2, 3]}, tmp_path / "list.bin")
    with pytest.raises(OpenClipError, match="expected a state dict of tensors"):
        read_source(tmp_path / "list.bin", arch="ViT-B-32")


def test_no_tokenizer_files_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    torch.save(_small_state(SMALL_CFG), path)
    with pytest.raises(OpenClipError, match="no CLIP tokenizer files beside the weights"):
        write_tokenizer(tmp_path, tmp_path)


def test_cli_refusal_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "clipforge_cli", "model", "import", f"open_clip:{tmp_path / 'missing.pt'}",
         "--out", str(tmp_path / "ckpt")],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "no such file or folder" in proc.stderr
