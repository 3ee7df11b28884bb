"""An open_clip model's config and weights in transformers' CLIPModel layout, or one line naming
the first thing that does not map (ResNet, timm, CoCa, SigLIP, custom blocks ...).
"""

from __future__ import annotations

from typing import Any

import torch

from interop.open_clip_archs import (
    CONTEXT_LENGTH,
    OPENAI_MEAN,
    OPENAI_STD,
    SUPPORTED,
    VOCAB_SIZE,
    OpenClipError,
)

# Config entries that change the maths of a tower in ways a transformers CLIP cannot express.
_VISION_UNMAPPED = {
    "timm_model_name": "a timm image tower", "ls_init_value": "layer scale", "attentional_pool": "attentional pooling",
    "no_ln_pre": "no ln_pre", "final_ln_after_pool": "ln_post after pooling", "block_type": "custom blocks",
    "qk_norm": "q/k norm", "scaled_cosine_attn": "scaled cosine attention", "scale_heads": "head scales",
    "scale_attn_inner": "inner attention norm", "scale_attn": "attention norm", "scale_fc": "MLP norm",
    "act_kwargs": "activation arguments",
}
_TEXT_UNMAPPED = {
    "hf_model_name": "a Hugging Face text tower", "hf_tokenizer_name": "a tokenizer other than CLIP's BPE",
    "tokenizer_mode": "a tokenizer other than CLIP's BPE", "ls_init_value": "layer scale",
    "embed_cls": "a CLS text embedding (CoCa)", "no_causal_mask": "bidirectional text attention",
    "final_ln_after_pool": "ln_final after pooling", "proj_bias": "a text projection bias",
    "block_type": "custom blocks", "qk_norm": "q/k norm", "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "head scales", "scale_attn_inner": "inner attention norm", "scale_attn": "attention norm",
    "scale_fc": "MLP norm", "act_kwargs": "activation arguments",
}


def _refuse(what: str) -> OpenClipError:
    return OpenClipError(f"this open_clip model has {what}, which does not map; supported: {SUPPORTED}")


def check_supported(cfg: dict[str, Any]) -> None:
    """One line naming the first thing that does not map onto a transformers CLIP."""
    if "multimodal_cfg" in cfg:
        raise _refuse("a multimodal decoder (CoCa)")
    if cfg.get("init_logit_bias") is not None:
        raise _refuse("a logit bias (SigLIP)")
    if cfg.get("custom_text"):
        raise _refuse("a custom text tower (custom_text)")
    vision, text = cfg.get("vision_cfg"), cfg.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict) or not isinstance(cfg.get("embed_dim"), int):
        raise OpenClipError("open_clip model_cfg needs embed_dim, vision_cfg and text_cfg")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise _refuse("a ResNet image tower (ModifiedResNet)")
    for key, what in _VISION_UNMAPPED.items():
        if vision.get(key):
            raise _refuse(f"{what} in the image tower ({key})")
    for key, what in _TEXT_UNMAPPED.items():
        if text.get(key):
            raise _refuse(f"{what} in the text tower ({key})")
    if vision.get("pool_type", "tok") != "tok":
        raise _refuse(f"image pooling {vision['pool_type']!r} (only the class token maps)")
    if text.get("pool_type", "argmax") != "argmax":
        raise _refuse(f"text pooling {text['pool_type']!r} (only the end-of-text token maps)")
    if text.get("proj_type", "linear") != "linear":
        raise _refuse(f"text projection {text['proj_type']!r}")
    if not isinstance(vision.get("image_size", 224), int) or not isinstance(vision.get("patch_size", 16), int):
        raise _refuse("a non-square image size or patch")
    tok_kwargs = text.get("tokenizer_kwargs") or {}
    if {k: v for k, v in tok_kwargs.items() if (k, v) != ("clean", "lower")}:
        # the import cleans text as open_clip's default "lower" does (model.tokenizer.open_clip_clean)
        raise _refuse(f"tokenizer arguments {tok_kwargs} (only CLIP's BPE with clean 'lower' maps)")
    if text.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise _refuse(f"a {text['vocab_size']}-token vocabulary (CLIP's BPE has {VOCAB_SIZE})")
    for tower, sub in (("image", vision), ("text", text)):
        norm = sub.get("norm_kwargs") or {}
        if set(norm) - {"eps"}:
            raise _refuse(f"layer-norm arguments {sorted(norm)} in the {tower} tower")


def check_preprocess(pp: dict[str, Any]) -> None:
    if pp.get("resize_mode", "shortest") != "shortest":
        raise _refuse(f"resize_mode {pp['resize_mode']!r} (only 'shortest' then a centre crop maps)")
    if pp.get("interpolation", "bicubic") not in ("bicubic", "random"):  # open_clip evaluates 'random' as bicubic
        raise _refuse(f"interpolation {pp['interpolation']!r} (only bicubic maps)")
    if not isinstance(pp.get("size", 0), int):
        raise _refuse("a non-square preprocessing size")



def _act(cfg: dict[str, Any]) -> str:
    return "quick_gelu" if cfg.get("quick_gelu") else "gelu"


def _eps(sub: dict[str, Any]) -> float:
    return float((sub.get("norm_kwargs") or {}).get("eps", 1e-5))


def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json for transformers' CLIPModel, from an open_clip model_cfg."""
    vision, text, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed,
        "logit_scale_init_value": 2.6592,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.get("vocab_size", VOCAB_SIZE),
            "hidden_size": t_width,
            "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", CONTEXT_LENGTH),
            "hidden_act": _act(cfg),
            "layer_norm_eps": _eps(text),
            "projection_dim": embed,
            "bos_token_id": VOCAB_SIZE - 2,
            "eos_token_id": VOCAB_SIZE - 1,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v_width,
            "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": v_width // vision.get("head_width", 64),
            "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 16),
            "num_channels": 3,
            "hidden_act": _act(cfg),
            "layer_norm_eps": _eps(vision),
            "projection_dim": embed,
        },
    }


def preprocessor_config(cfg: dict[str, Any], pp: dict[str, Any]) -> dict[str, Any]:
    """open_clip's eval transform (short side to the model's size, centre crop, normalise) as CLIPImageProcessor."""
    size = cfg["vision_cfg"].get("image_size", 224)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in pp.get("mean", OPENAI_MEAN)],
        "image_std": [float(v) for v in pp.get("std", OPENAI_STD)],
        "do_convert_rgb": True,
    }


def _block_map(src: str, dst: str) -> dict[str, str]:
    return {
        f"{src}.ln_1.weight": f"{dst}.layer_norm1.weight", f"{src}.ln_1.bias": f"{dst}.layer_norm1.bias",
        f"{src}.ln_2.weight": f"{dst}.layer_norm2.weight", f"{src}.ln_2.bias": f"{dst}.layer_norm2.bias",
        f"{src}.attn.out_proj.weight": f"{dst}.self_attn.out_proj.weight",
        f"{src}.attn.out_proj.bias": f"{dst}.self_attn.out_proj.bias",
        f"{src}.mlp.c_fc.weight": f"{dst}.mlp.fc1.weight", f"{src}.mlp.c_fc.bias": f"{dst}.mlp.fc1.bias",
        f"{src}.mlp.c_proj.weight": f"{dst}.mlp.fc2.weight", f"{src}.mlp.c_proj.bias": f"{dst}.mlp.fc2.bias",
    }


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hf = hf_config(cfg)
    v, t, embed = hf["vision_config"], hf["text_config"], cfg["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (v["hidden_size"], 3, v["patch_size"], v["patch_size"]),
        "visual.class_embedding": (v["hidden_size"],),
        "visual.positional_embedding": (grid * grid + 1, v["hidden_size"]),
        "visual.ln_pre.weight": (v["hidden_size"],), "visual.ln_pre.bias": (v["hidden_size"],),
        "visual.ln_post.weight": (v["hidden_size"],), "visual.ln_post.bias": (v["hidden_size"],),
        "visual.proj": (v["hidden_size"], embed),
        "token_embedding.weight": (t["vocab_size"], t["hidden_size"]),
        "positional_embedding": (t["max_position_embeddings"], t["hidden_size"]),
        "ln_final.weight": (t["hidden_size"],), "ln_final.bias": (t["hidden_size"],),
        "text_projection": (t["hidden_size"], embed),
        "logit_scale": (),
    }
    for prefix, sub in (("visual.transformer", v), ("transformer", t)):
        d, m = sub["hidden_size"], sub["intermediate_size"]
        for i in range(sub["num_hidden_layers"]):
            b = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{b}.ln_1.weight": (d,), f"{b}.ln_1.bias": (d,), f"{b}.ln_2.weight": (d,), f"{b}.ln_2.bias": (d,),
                f"{b}.attn.in_proj_weight": (3 * d, d), f"{b}.attn.in_proj_bias": (3 * d,),
                f"{b}.attn.out_proj.weight": (d, d), f"{b}.attn.out_proj.bias": (d,),
                f"{b}.mlp.c_fc.weight": (m, d), f"{b}.mlp.c_fc.bias": (m,),
                f"{b}.mlp.c_proj.weight": (d, m), f"{b}.mlp.c_proj.bias": (d,),
            })
    return shapes


def check_weights(state: dict[str, torch.Tensor], cfg: dict[str, Any], *, what: str) -> None:
    """Every tensor the config needs, at its shape, and nothing the mapping would drop."""
    expected = expected_shapes(cfg)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") and k != "attn_mask"}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise OpenClipError(f"the weights do not match {what}: {len(missing)} tensors missing, e.g. {missing[0]}")
    if extra:
        raise OpenClipError(f"the weights do not match {what}: {len(extra)} tensors it has no place for, e.g. {extra[0]}")
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape and not (key == "logit_scale" and state[key].numel() == 1):
            raise OpenClipError(f"the weights do not match {what}: {key} is {got}, expected {shape}")


def hf_state_dict(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """open_clip names and layouts -> CLIPModel's, in float32 (OpenAI's fp16 included)."""
    hf = hf_config(cfg)
    f = {k: v.detach().to(torch.float32) for k, v in state.items()}
    out: dict[str, torch.Tensor] = {
        "vision_model.embeddings.patch_embedding.weight": f["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": f["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": f["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": f["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": f["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": f["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": f["visual.ln_post.bias"],
        "visual_projection.weight": f["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": f["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": f["positional_embedding"],
        "text_model.final_layer_norm.weight": f["ln_final.weight"],
        "text_model.final_layer_norm.bias": f["ln_final.bias"],
        "text_projection.weight": f["text_projection"].t(),
        "logit_scale": f["logit_scale"].reshape(()),
    }
    for src, dst, sub in (("visual.transformer", "vision_model.encoder", hf["vision_config"]),
                          ("transformer", "text_model.encoder", hf["text_config"])):
        for i in range(sub["num_hidden_layers"]):
            s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
            for a, b in _block_map(s, d).items():
                out[b] = f[a]
            for part, w, bias in zip(("q", "k", "v"), f[f"{s}.attn.in_proj_weight"].chunk(3),
                                     f[f"{s}.attn.in_proj_bias"].chunk(3)):
                out[f"{d}.self_attn.{part}_proj.weight"] = w
                out[f"{d}.self_attn.{part}_proj.bias"] = bias
    return {k: v.contiguous() for k, v in out.items()}

