"""The peer benchmark's shared weights: a ViT-B/32-sized transformers CLIPModel with random weights.

Speed does not depend on the weights' values, so the bench builds OpenAI ViT-B/32's exact shape
(openai/clip-vit-base-patch32's config values, typed in here, nothing downloaded) with seeded
random weights, perturbed so no LayerNorm or bias is left at its trivial init, and CLIP's real
49,408-token BPE from the open_clip wheel `make install` keeps. The folder is what infinity and
clip-retrieval load; `clipforge model import hf:DIR` turns it into clipforge's checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WHEELS = ROOT / ".cache" / "wheels"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
SEED = 0
NOISE_STD = 0.02  # added to every parameter after transformers' init

# openai/clip-vit-base-patch32's config.json, the fields that shape the computation.
VIT_B_32: dict[str, Any] = {
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
        "initializer_range": 0.02, "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        "projection_dim": 512,
    },
}
# Its preprocessor_config.json.
PREPROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": {"shortest_edge": 224},
}
RECIPE = {"config": VIT_B_32, "preprocessor": PREPROCESSOR, "seed": SEED, "noise_std": NOISE_STD}
MARKER = "peer_bench_weights.json"


def _bpe_folder(tmp: Path) -> Path:
    """A folder holding open_clip's BPE file, taken from the kept wheel (no install, no download)."""
    wheels = sorted(WHEELS.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise SystemExit(f"CLIP's BPE vocabulary needs an open_clip_torch wheel in {WHEELS} (make install keeps one)")
    from interop.open_clip import BPE_NAME

    with zipfile.ZipFile(wheels[-1]) as zf:
        (tmp / BPE_NAME).write_bytes(zf.read(BPE_MEMBER))
    return tmp


def build_hf_folder(folder: Path) -> bool:
    """The transformers CLIPModel folder, written once per recipe; True when it was (re)built."""
    try:
        if json.loads((folder / MARKER).read_text()) == json.loads(json.dumps(RECIPE)):
            return False
    except (OSError, ValueError):
        pass
    import torch
    import transformers

    from interop.open_clip import write_tokenizer
    from model.fileio import publish_directory

    transformers.logging.set_verbosity_error()
    cfg = transformers.CLIPConfig(
        text_config=VIT_B_32["text_config"], vision_config=VIT_B_32["vision_config"],
        projection_dim=VIT_B_32["projection_dim"], logit_scale_init_value=VIT_B_32["logit_scale_init_value"],
    )
    torch.manual_seed(SEED)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * NOISE_STD)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.save_pretrained(staged, safe_serialization=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(_bpe_folder(Path(tmp)), staged)
    transformers.CLIPImageProcessor(**PREPROCESSOR).save_pretrained(staged)
    # A tokenizer.json too, so every loader reads the same fast tokenizer without converting.
    transformers.CLIPTokenizerFast.from_pretrained(str(staged)).save_pretrained(staged)
    (staged / MARKER).write_text(json.dumps(RECIPE, indent=2), encoding="utf-8")
    publish_directory(staged, folder)
    return True


def import_checkpoint(hf_folder: Path, ckpt: Path, *, rebuild: bool) -> Path:
    """`clipforge model import hf:DIR --out CKPT`, the CLI a user runs; kept while the folder is unchanged."""
    if (ckpt / "model.safetensors").is_file() and not rebuild:
        return ckpt
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    subprocess.run([sys.executable, "-m", "clipforge_cli", "model", "import", f"hf:{hf_folder}", "--out", str(ckpt)],
                   cwd=ROOT, check=True)
    return ckpt


def export_onnx(ckpt: Path, out: Path) -> Path:
    """`clipforge model export CKPT --to onnx:DIR`, for `clipforge serve --onnx`; kept while newer than the checkpoint."""
    marker = out / "clipforge_onnx.json"
    if marker.is_file() and marker.stat().st_mtime >= (ckpt / "model.safetensors").stat().st_mtime:
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    subprocess.run([sys.executable, "-m", "clipforge_cli", "model", "export", str(ckpt), "--to", f"onnx:{out}"],
                   cwd=ROOT, check=True)
    return out


def rows_cosine(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Cosine between row i of a and row i of b."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return [float(x) for x in (a * b).sum(axis=1)]


def _features(out: Any) -> Any:
    """get_*_features returns a tensor, or (newer transformers) an output whose pooler_output is it."""
    return out if hasattr(out, "numpy") else out.pooler_output


def agreement(hf_folder: Path, ckpt: Path, texts: list[str], images: list[Path]) -> dict[str, float]:
    """Cosine between transformers' and clipforge's embeddings of the same inputs: the weights are the same."""
    import torch
    import transformers
    from PIL import Image

    from model import CLIPInference

    transformers.logging.set_verbosity_error()
    hf = transformers.CLIPModel.from_pretrained(str(hf_folder)).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(hf_folder))
    pil = [Image.open(p).convert("RGB") for p in images]
    with torch.no_grad():
        tok = processor(text=texts, return_tensors="pt", padding=True)
        hf_text = _features(hf.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
        hf_image = _features(hf.get_image_features(pixel_values=pixels))
    clip = CLIPInference.load(ckpt)
    ours_text, ours_image = clip.embed_texts(texts), clip.embed_images(images)
    text_cos = rows_cosine(hf_text.numpy(), ours_text)
    image_cos = rows_cosine(hf_image.numpy(), ours_image)
    # The control: the same pairs shifted by one row, different inputs. Were the embeddings nearly
    # input-independent (random weights can do that), these would be near 1 too and prove nothing.
    text_other = rows_cosine(hf_text.numpy(), np.roll(ours_text, 1, axis=0))
    image_other = rows_cosine(hf_image.numpy(), np.roll(ours_image, 1, axis=0))
    return {"text_min_cosine": round(min(text_cos), 6), "image_min_cosine": round(min(image_cos), 6),
            "different_texts_max_cosine": round(max(text_other), 6),
            "different_images_max_cosine": round(max(image_other), 6),
            "texts": len(texts), "images": len(images)}


def check_agreement(result: dict[str, float], *, threshold: float = 0.999) -> None:
    """Stop the bench unless every same-input cosine passes `threshold` and beats every different-input one."""
    for kind in ("text", "image"):
        same, other = result.get(f"{kind}_min_cosine"), result.get(f"different_{kind}s_max_cosine")
        if same is None:
            continue
        if same < threshold or (other is not None and same <= other):
            raise SystemExit(f"not the same weights: {kind} cosine {same} (different inputs reach {other})")
