"""CLIPConfig validation, serialisation and the named presets (shapes for every preset)."""

from __future__ import annotations

import json

import pytest
import torch

from model import CLIP, PRESETS, CLIPConfig, ConfigError, preset_config
from model.errors import ClipforgeError

SMALL_IMAGE_PRESETS = [name for name in PRESETS if PRESETS[name].get("img_size", 224) <= 64]
# presets of clipforge's own towers; the shape checks read their internals (a transformers tower has its own tests)
BIG_PRESETS = [name for name in PRESETS if name not in SMALL_IMAGE_PRESETS
               and PRESETS[name].get("image_tower", "clipforge") == "clipforge" and PRESETS[name].get("text_tower", "clipforge") == "clipforge"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"img_dim": 100, "img_n_heads": 6}, "img_dim (100) must be divisible by img_n_heads (6)"),
        ({"text_dim": 100, "text_n_heads": 6}, "text_dim (100) must be divisible by text_n_heads (6)"),
        ({"text_n_heads": 12, "text_n_kv_heads": 5}, "text_n_heads (12) must be divisible by text_n_kv_heads (5)"),
        ({"img_size": 100, "patch_size": 16}, "img_size (100) must be divisible by patch_size (16)"),
        ({"img_pool": "max"}, "img_pool must be 'cls' or 'mean'"),
        ({"text_pos": "alibi"}, "text_pos must be 'rope' or 'learned'"),
        ({"img_dropout_rate": 1.0}, "img_dropout_rate must be in [0, 1)"),
        ({"img_n_layers": 0}, "img_n_layers must be a positive number"),
        ({"img_dim": 256.0}, "img_dim must be of type int"),
        ({"text_n_layers": "12"}, "text_n_layers must be of type int"),
        ({"use_sdpa": "yes"}, "use_sdpa must be of type bool"),
        ({"mlp_act": "relu"}, "mlp_act must be one of 'gelu', 'quick_gelu'"),
        ({"image_resize": "stretch"}, "image_resize must be one of 'crop_box', 'shortest_edge'"),
        ({"image_resize_size": 256}, "image_resize_size is only used with image_resize 'shortest_edge'"),
        ({"image_resize": "shortest_edge", "image_resize_size": 200}, "image_resize_size (200) must be at least img_size (224)"),
        ({"image_resize": "shortest_edge", "image_resize_size": 256.0}, "image_resize_size must be of type int | None"),
        ({"image_resize": "shortest_edge", "image_crop_offset": "ceil"}, "image_crop_offset must be one of 'floor', 'round'"),
        ({"image_crop_offset": "round"}, "image_crop_offset is only used with image_resize 'shortest_edge'"),
        ({"num_classes": 0}, "num_classes must be a positive integer or null"),
        ({"num_classes": True}, "num_classes must be of type int | None"),
        ({"image_mean": [0.5, 0.5]}, "image_mean and image_std need 3 values"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std values must be positive"),
        ({"image_mean": "abc"}, "image_mean and image_std must be lists of numbers"),
        ({"max_seq_len": 2}, "max_seq_len must leave room"),
        ({"pad_token_id": 1}, "pad, sot and eot token ids must be distinct"),
        ({"text_dim": 36, "text_n_heads": 12, "text_n_kv_heads": 3}, "rotary embeddings need an even head dimension"),
    ],
)
def test_invalid_configs_raise_clear_config_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        CLIPConfig.from_dict({**CLIPConfig().to_dict(), **changes})
    assert message in str(info.value)
    assert isinstance(info.value, ClipforgeError)


def test_unknown_fields_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown config field\\(s\\): colour, wings"):
        CLIPConfig.from_dict({**CLIPConfig().to_dict(), "wings": 2, "colour": "red"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        CLIPConfig.from_dict(["img_size", 224])  # type: ignore[arg-type]


def test_old_checkpoints_is_flash_field_reads_as_use_sdpa() -> None:
    old = {k: v for k, v in CLIPConfig().to_dict().items() if k not in ("use_sdpa", "mlp_act", "image_resize",
                                                                       "image_resize_size")}
    cfg = CLIPConfig.from_dict({**old, "is_flash": False})
    assert cfg.use_sdpa is False
    assert (cfg.mlp_act, cfg.image_resize, cfg.image_resize_size) == ("gelu", "crop_box", None)


def test_crop_offset_is_written_only_when_it_is_not_the_default() -> None:
    """config.json of earlier checkpoints (no image_crop_offset) loads as "floor" and is written as it was."""
    floor = CLIPConfig(image_resize="shortest_edge")
    assert "image_crop_offset" not in floor.to_dict()
    assert CLIPConfig.from_dict(json.loads(floor.to_json())).image_crop_offset == "floor"
    rounded = floor.replace(image_crop_offset="round")
    assert rounded.to_dict()["image_crop_offset"] == "round"
    assert CLIPConfig.from_dict(json.loads(rounded.to_json())) == rounded


def test_odd_head_dim_is_fine_with_learned_positions() -> None:
    cfg = CLIPConfig(text_dim=36, text_n_heads=12, text_n_kv_heads=3, text_pos="learned")
    assert cfg.text_dim // cfg.text_n_heads == 3


def test_json_round_trip_and_replace() -> None:
    cfg = preset_config("thinkclip", img_pool="mean", num_classes=10)
    again = CLIPConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    changed = cfg.replace(img_size=112)
    assert changed.img_size == 112 and changed.n_patches == 49 and cfg.img_size == 224
    with pytest.raises(ConfigError):
        cfg.replace(img_size=100)


def test_thinkclip_and_vit_b_16_presets_are_exact() -> None:
    t = preset_config("thinkclip")
    assert (t.img_size, t.patch_size, t.img_dim, t.img_n_heads, t.img_n_layers) == (224, 16, 384, 6, 12)
    assert (t.vocab_size, t.max_seq_len, t.text_dim, t.text_n_heads, t.text_n_kv_heads, t.text_n_layers) == (
        6400, 64, 768, 12, 3, 12,
    )
    assert t.align_dim == 512 and t.text_pos == "rope"
    v = preset_config("vit-b-16")
    assert (v.img_size, v.patch_size, v.img_dim, v.img_n_layers) == (224, 16, 768, 12)
    assert (v.text_dim, v.text_n_layers, v.vocab_size, v.max_seq_len, v.align_dim) == (512, 8, 49408, 77, 512)
    assert v.text_pos == "learned"
    ladder = {name: (preset_config(name).img_dim, preset_config(name).img_n_heads, preset_config(name).img_n_layers)
              for name in ("tiny", "small", "base", "large")}
    assert ladder == {"tiny": (256, 4, 6), "small": (384, 6, 8), "base": (512, 8, 12), "large": (768, 12, 24)}


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        preset_config("huge")


def test_vit_b_16_matches_the_published_parameter_count() -> None:
    # OpenAI's ViT-B/16 CLIP has 149.6 M parameters; ours differs only in the text tower's
    # per-layer details, so the image tower (86.2 M incl. projection) must match closely.
    with torch.device("meta"):
        model = CLIP(preset_config("vit-b-16"))
    counts = model.num_params()
    assert 86.0e6 < counts["image"] < 86.5e6
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["image"] + counts["text"] + 1 == counts["total"]  # + the temperature


def _check_shapes(model: CLIP, cfg: CLIPConfig, batch: int, device: str) -> None:
    pixels = torch.zeros(batch, cfg.channel, cfg.img_size, cfg.img_size, device=device)
    ids = torch.zeros(batch, cfg.max_seq_len, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1], ids[:, 2] = cfg.sot_token_id, 5, cfg.eot_token_id
    assert model.encode_image(pixels).shape == (batch, cfg.align_dim)
    assert model.encode_text(ids).shape == (batch, cfg.align_dim)
    logits_img, logits_txt = model(pixels, ids)
    assert logits_img.shape == (batch, batch) and logits_txt.shape == (batch, batch)
    assert model.visual.pos_embed.shape == (1, cfg.n_patches + 1, cfg.img_dim)
    assert model.text.tok_embed.weight.shape == (cfg.vocab_size, cfg.text_dim)
    hd = cfg.text_dim // cfg.text_n_heads
    qkv = model.text.blocks[0].attn.qkv.weight
    assert qkv.shape == ((cfg.text_n_heads + 2 * cfg.text_n_kv_heads) * hd, cfg.text_dim)
    assert len(model.visual.blocks) == cfg.img_n_layers and len(model.text.blocks) == cfg.text_n_layers


@pytest.mark.parametrize("name", SMALL_IMAGE_PRESETS)
def test_small_presets_run_with_real_weights(name: str) -> None:
    cfg = preset_config(name)
    model = CLIP(cfg).eval()
    with torch.no_grad():
        _check_shapes(model, cfg, 2, "cpu")
        emb = model.encode_image(torch.randn(2, 3, cfg.img_size, cfg.img_size))
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", BIG_PRESETS)
def test_big_presets_build_on_meta_device(name: str) -> None:
    cfg = preset_config(name)
    with torch.device("meta"):
        model = CLIP(cfg)
        _check_shapes(model, cfg, 2, "meta")


def test_classification_head_and_mean_pooling() -> None:
    cfg = preset_config("mini-32", num_classes=7, img_pool="mean")
    model = CLIP(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert model.visual(x).shape == (3, 7)
        feats = model.visual.forward_features(x)
        tokens = []
        model.visual.norm.register_forward_hook(lambda m, i, o: tokens.append(o))
        model.visual.forward_features(x)
    assert torch.allclose(feats, tokens[0][:, 1:].mean(dim=1))
