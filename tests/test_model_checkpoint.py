"""Checkpoints: bit-identical round trip, content hash, atomic writes, and clear errors on corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (
    CLIP,
    CheckpointError,
    CLIPTokenizer,
    content_hash,
    load_checkpoint,
    preset_config,
    read_meta,
    save_checkpoint,
    update_meta,
)
from model.errors import ClipforgeError

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")] * 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIP, CLIPTokenizer]:
    torch.manual_seed(0)
    cfg = preset_config("mini-32", img_dim=64, text_dim=64, align_dim=32)
    tok = CLIPTokenizer.train(CAPTIONS, vocab_size=cfg.vocab_size, max_length=cfg.max_seq_len)
    model = CLIP(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, model, tok, {"step": 7, "class_names": ["circle", "square"], "metrics": {"acc": 0.5}})
    return path, model, tok


@pytest.fixture
def copy(saved: tuple[Path, CLIP, CLIPTokenizer], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def _inputs(tok: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=gen), tok.encode(["a red circle", "a blue square", "green"])


def test_save_then_load_gives_bit_identical_outputs(saved: tuple[Path, CLIP, CLIPTokenizer]) -> None:
    path, model, tok = saved
    loaded, tok2, meta = load_checkpoint(path)
    assert not loaded.training
    pixels, ids = _inputs(tok)
    assert torch.equal(tok2.encode(["a red circle", "a blue square", "green"]), ids)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
        assert torch.equal(loaded(pixels, ids)[0], model(pixels, ids)[0])
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.cfg == model.cfg
    assert meta["step"] == 7 and meta["class_names"] == ["circle", "square"] and meta["metrics"] == {"acc": 0.5}
    assert meta["content_hash"] == content_hash(path) and len(meta["content_hash"]) == 64
    assert meta["params"] == model.num_params() and "created" in meta


def test_directory_layout_and_no_pickle(saved: tuple[Path, CLIP, CLIPTokenizer]) -> None:
    path = saved[0]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "model.safetensors", "tokenizer.json"]
    head = (path / "model.safetensors").read_bytes()[:8]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # neither pickle nor a torch zip
    assert set(load_file(str(path / "model.safetensors"))) == set(saved[1].state_dict())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_content_hash_is_deterministic_and_tracks_weights(saved: tuple[Path, CLIP, CLIPTokenizer],
                                                          tmp_path: Path) -> None:
    path, model, tok = saved
    again = save_checkpoint(tmp_path / "again", model, tok, {"step": 99})
    assert again == read_meta(path)["content_hash"]  # meta does not enter the identity
    changed = CLIP(model.cfg)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.text_proj.weight[0, 0] += 1e-3
    assert save_checkpoint(tmp_path / "changed", changed, tok) != again


def test_overwrite_is_atomic_and_replaces_the_old_checkpoint(saved: tuple[Path, CLIP, CLIPTokenizer],
                                                             tmp_path: Path) -> None:
    _, model, tok = saved
    target = tmp_path / "ckpt"
    first = save_checkpoint(target, model, tok, {"step": 1})
    other = CLIP(model.cfg)
    second = save_checkpoint(target, other, tok, {"step": 2})
    assert first != second and read_meta(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # A failing save leaves the existing checkpoint untouched and no temp dir behind.
    with pytest.raises(AttributeError):
        save_checkpoint(target, other, object(), {"step": 3})  # type: ignore[arg-type]
    assert read_meta(target)["step"] == 2 and content_hash(target) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_update_meta_merges_keys_and_keeps_the_hash(copy: Path) -> None:
    before = content_hash(copy)
    meta = update_meta(copy, metrics={"top1": 0.9}, epoch=3)
    assert meta["metrics"] == {"top1": 0.9} and meta["epoch"] == 3 and meta["step"] == 7
    assert read_meta(copy) == meta and content_hash(copy) == before
    load_checkpoint(copy)  # still verifies


def test_load_at_another_image_size_interpolates_positions(saved: tuple[Path, CLIP, CLIPTokenizer]) -> None:
    path, model, _ = saved
    big, _, _ = load_checkpoint(path, img_size=64)
    assert big.cfg.img_size == 64 and big.visual.pos_embed.shape == (1, 1 + 16 * 16, model.cfg.img_dim)
    assert torch.equal(big.visual.pos_embed[:, 0], model.visual.pos_embed[:, 0])
    with torch.no_grad():
        out = big.encode_image(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.cfg.align_dim) and torch.isfinite(out).all()
    same, _, _ = load_checkpoint(path, img_size=32)
    assert torch.equal(same.visual.pos_embed, model.visual.pos_embed)


# --------------------------------------------------------------------------- corruption
def _rehash(path: Path) -> None:
    """Record the current files' hash, so the error comes from the check under test, not the hash."""
    update_meta(path, content_hash=content_hash(path))


def _expect(path: Path, *fragments: str, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kw)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ClipforgeError)
    return info.value


def test_flipped_bytes_in_weights_are_detected(copy: Path) -> None:
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    _expect(copy, "corrupt or was modified", "content hash")


def test_corrupt_safetensors_header_is_a_clear_error(copy: Path) -> None:
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage inside the JSON header
    weights.write_bytes(bytes(data))
    _expect(copy, "model.safetensors cannot be read", verify=False)
    weights.write_bytes(b"")
    _expect(copy, "model.safetensors cannot be read", verify=False)


def _rewrite_weights(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))
    _rehash(path)


def test_wrong_tensor_shape_names_the_tensor(copy: Path) -> None:
    _rewrite_weights(copy, lambda s: s.__setitem__("text_proj.weight", torch.zeros(32, 65)))
    _expect(copy, "text_proj.weight", "shape (32, 65)", "expects (32, 64)")


def test_missing_tensor_names_the_tensor(copy: Path) -> None:
    _rewrite_weights(copy, lambda s: s.pop("visual.blocks.1.attn.qkv.bias"))
    _expect(copy, "missing tensor(s): visual.blocks.1.attn.qkv.bias")


def test_unexpected_tensor_names_the_tensor(copy: Path) -> None:
    _rewrite_weights(copy, lambda s: s.__setitem__("visual.extra", torch.zeros(2)))
    _expect(copy, "unexpected tensor(s): visual.extra")


def test_config_that_does_not_match_the_weights(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_n_layers"] = 5
    (copy / "config.json").write_text(json.dumps(cfg))
    _expect(copy, "content hash")  # the identity changed
    _rehash(copy)
    _expect(copy, "missing tensor(s): text.blocks.4")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "meta.json"])
def test_missing_file_is_named(copy: Path, name: str) -> None:
    (copy / name).unlink()
    _expect(copy, f"missing {name}")


def test_missing_directory(tmp_path: Path) -> None:
    _expect(tmp_path / "nowhere", "does not exist")
    (tmp_path / "file").write_text("x")
    _expect(tmp_path / "file", "does not exist")


def test_bad_json_in_each_json_file(copy: Path) -> None:
    (copy / "meta.json").write_text("{not json")
    _expect(copy, "meta.json is not valid JSON")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_meta(copy)
    (copy / "meta.json").write_text("[1, 2]")
    _expect(copy, "meta.json must hold a JSON object, not list")
    (copy / "meta.json").write_text("{}")  # no recorded hash: nothing to verify against
    (copy / "config.json").write_text("{\"img_size\": 32,")
    _expect(copy, "config.json is not valid JSON")


def test_bad_tokenizer_file(copy: Path) -> None:
    (copy / "tokenizer.json").write_text("{\"model\": 3}")
    _rehash(copy)
    _expect(copy, "tokenizer.json is not a valid tokenizer")


def test_unknown_config_field_and_invalid_values(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "wings": 2}))
    _rehash(copy)
    _expect(copy, "config.json", "unknown config field(s): wings")
    (copy / "config.json").write_text(json.dumps({**cfg, "img_dim": "wide"}))
    _rehash(copy)
    _expect(copy, "img_dim must be of type int")
    (copy / "config.json").write_text(json.dumps([1, 2]))
    _rehash(copy)
    _expect(copy, "must be a mapping")


def test_tokenizer_larger_than_the_model_vocab(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10}))
    _rehash(copy)
    _expect(copy, "tokenizer has", "only 10")


def _replace_tokenizer(path: Path, edit) -> None:
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    _rehash(path)


def test_tokenizer_longer_than_the_model_context(copy: Path) -> None:
    _replace_tokenizer(copy, lambda d: d["clipforge"].__setitem__("max_length", 64))
    _expect(copy, "max_length 64", "max_seq_len 32")
    _replace_tokenizer(copy, lambda d: d["clipforge"].__setitem__("max_length", 16))  # shorter is fine
    assert load_checkpoint(copy)[1].max_length == 16


@pytest.mark.parametrize("field, ids", [("pad_token_id", (3, 1, 2)), ("sot_token_id", (0, 2, 1)),
                                        ("eot_token_id", (0, 1, 5))])
def test_special_token_ids_that_differ_from_the_config(copy: Path, field: str, ids: tuple[int, int, int]) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(zip(("pad_token_id", "sot_token_id", "eot_token_id"), ids))
    (copy / "config.json").write_text(json.dumps(cfg))
    _rehash(copy)
    _expect(copy, field, f"is {cfg[field]}")


def test_tokenizer_with_its_special_tokens_moved(copy: Path) -> None:
    def swap(data: dict) -> None:  # a tokenizer whose <|startoftext|> and <|endoftext|> traded ids
        vocab = data["model"]["vocab"]
        vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
        for tok in data["added_tokens"]:
            tok["id"] = {1: 2, 2: 1}.get(tok["id"], tok["id"])

    _replace_tokenizer(copy, swap)
    _expect(copy, "tokenizer sot id is 2", "sot_token_id is 1")
