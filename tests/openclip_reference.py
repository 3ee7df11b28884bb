"""Reference outputs of the real open_clip, for the open_clip import tests.

Runs under the reference environment (.venv-openclip, built by `make reference-venv`),
never under the project's own: open_clip needs torchvision, which cannot import beside
the project's torch. It builds open_clip CLIPs with random weights, perturbs every
parameter (a dropped bias or norm then changes the outputs), saves them in the layouts
the importer reads, loads each back through open_clip's own loaders and writes open_clip's
embeddings of real photos (its own preprocessing) and its token ids of tricky texts.

    python tests/openclip_reference.py OUT --images a.jpg b.jpg --texts texts.json [--standard ViT-B-32]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import open_clip
import safetensors.torch
import torch
from open_clip.model import convert_weights_to_lp, set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_config_for_hf
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from PIL import Image

# Small open_clip configs (open_clip's own model config dicts) so every layout builds in
# well under a second. The gelu one has 4 heads per tower and an MLP ratio of 2 (head split
# and intermediate size mapped from the config); the quick_gelu one keeps OpenAI's rule of
# 64-wide heads, which open_clip's OpenAI loader infers from the weights alone.
SMALL_GELU = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}
SMALL_QUICKGELU = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
# A preprocessing that differs from OpenAI's, so the import must carry mean and std through.
HUB_PREPROCESS = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.3, 0.2], "interpolation": "bicubic", "resize_mode": "shortest"}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter moves off its initial value: ones, zeros and shared init alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            spread = float(param.float().std()) if param.numel() > 1 else 0.0
            param.add_((noise * (0.1 * spread if spread > 0 else 0.1)).to(param.dtype))
        model.logit_scale.fill_(math.log(1 / 0.05))  # a temperature other than open_clip's init


def write_clip_bpe_files(directory: Path) -> None:
    """vocab.json + merges.txt as a hub repo carries them, built from open_clip's own BPE file."""
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def embed(model: torch.nn.Module, preprocess, images: list[Path], tokens: torch.Tensor) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in images])
        return {
            "image": model.encode_image(pixels).float().numpy(),
            "text": model.encode_text(tokens).float().numpy(),
            "logit_scale": np.float32(model.logit_scale.float().exp().item()),
            "pixels": pixels.numpy(),
        }


def state_dict_with_quirks(model: torch.nn.Module) -> dict:
    """What open_clip's training script saves: a `state_dict` wrapper, DDP's `module.` prefix, here in fp16."""
    return {"epoch": 3, "state_dict": {f"module.{k}": v.half() for k, v in model.state_dict().items()}}


def build(cfg: dict, seed: int, preprocess: dict | None = None) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(cfg)))
    perturb(model, seed)
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(), preprocess or {}))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=Path, nargs="+", required=True)
    parser.add_argument("--texts", type=Path, required=True, help="a JSON list of strings")
    parser.add_argument("--standard", default=None, help="also a standard open_clip config (e.g. ViT-B-32) as a bare state dict")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tokens = tokenizer(texts)
    results: dict[str, np.ndarray] = {"tokens": tokens.numpy()}
    manifest: dict[str, dict] = {}

    def record(name: str, outputs: dict[str, np.ndarray], **info) -> None:
        for key, value in outputs.items():
            results[f"{name}/{key}"] = value
        manifest[name] = info

    # 1. Hub layout, safetensors, a non-OpenAI mean/std: loaded back through open_clip's local-dir loader.
    gelu = build(SMALL_GELU, seed=1, preprocess=HUB_PREPROCESS)
    hub = out / "hub_safetensors"
    hub.mkdir(exist_ok=True)
    save_config_for_hf(gelu, hub / "open_clip_config.json", model_config=SMALL_GELU)
    safetensors.torch.save_file(gelu.state_dict(), hub / "open_clip_model.safetensors")
    write_clip_bpe_files(hub)
    (hub / "README.md").write_text("---\nlicense: mit\nlibrary_name: open_clip\n---\n# test model\n", encoding="utf-8")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{hub}")
    record("hub_safetensors", embed(model, preprocess, args.images, tokens), path=hub.name)

    # 2. Hub layout, pickled .bin only, fp16, state_dict wrapper and module. prefix (a training checkpoint).
    quick = build(SMALL_QUICKGELU, seed=2)
    hub_bin = out / "hub_bin_fp16"
    hub_bin.mkdir(exist_ok=True)
    save_config_for_hf(quick, hub_bin / "open_clip_config.json", model_config=SMALL_QUICKGELU)
    torch.save(state_dict_with_quirks(quick), hub_bin / "open_clip_pytorch_model.bin")
    write_clip_bpe_files(hub_bin)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{hub_bin}")
    record("hub_bin_fp16", embed(model, preprocess, args.images, tokens), path=hub_bin.name)

    # 3. An OpenAI-style TorchScript archive (partly fp16, as OpenAI's files are), read by open_clip's OpenAI loader.
    openai_dir = out / "openai_jit"
    openai_dir.mkdir(exist_ok=True)
    scripted = build(SMALL_QUICKGELU, seed=3)
    convert_weights_to_lp(scripted)
    # OpenAI's CLIP keeps the causal mask as a plain attribute, not a state-dict buffer.
    mask = scripted._buffers.pop("attn_mask")
    scripted.attn_mask = mask
    torch.jit.save(torch.jit.script(scripted), openai_dir / "small-openai.pt")
    shutil.copy(default_bpe(), openai_dir / Path(default_bpe()).name)
    model = open_clip.load_openai_model(str(openai_dir / "small-openai.pt"), precision="fp32", device="cpu")
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    record("openai_jit", embed(model, preprocess, args.images, tokens), path=f"{openai_dir.name}/small-openai.pt")

    # 4. A standard config as a bare fp32 state dict (the --arch path), read by open_clip's pretrained= file loader.
    if args.standard:
        bare_dir = out / "bare"
        bare_dir.mkdir(exist_ok=True)
        standard = open_clip.create_model(args.standard)
        perturb(standard, seed=4)
        bare = bare_dir / f"{args.standard}.bin"
        torch.save(standard.state_dict(), bare)
        shutil.copy(default_bpe(), bare_dir / Path(default_bpe()).name)
        model, _, preprocess = open_clip.create_model_and_transforms(args.standard, pretrained=str(bare))
        record("bare", embed(model, preprocess, args.images, tokens), path=f"{bare_dir.name}/{bare.name}", arch=args.standard)

    np.savez(out / "reference.npz", **results)
    (out / "manifest.json").write_text(
        json.dumps({"open_clip": open_clip.__version__, "torch": torch.__version__, "variants": manifest}, indent=2),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
