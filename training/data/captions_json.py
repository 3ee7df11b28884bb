"""JSON caption files: a plain list, LLaVA-Pretrain conversations, and COCO captions."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import DataError
from .locate import image_path, resolve_images_root
from .records import RecordBuilder, RecordSet

_IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "path", "img")
_CAPTION_KEYS = ("caption", "captions", "text", "texts", "sentences")
_IMAGE_TOKEN = re.compile(r"<image>", re.IGNORECASE)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    try:
        if path.suffix.lower() == ".jsonl":
            with path.open("r", encoding="utf-8-sig") as f:
                return [json.loads(line) for line in f if line.strip()]
        with path.open("r", encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not valid JSON: {exc}") from exc


def sniff_json_kind(path: Path) -> str:
    """"coco" for an object (images + annotations), "llava" for a list of conversations, else "json"."""
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        head = f.read(65536)
    stripped = head.lstrip()
    if stripped.startswith("{") and path.suffix.lower() != ".jsonl":
        return "coco"
    if '"conversations"' in head:
        return "llava"
    return "json"


def _first_key(item: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in item and item[k] is not None:
            return item[k]
    return None


def load_json_list(path: Path, images_root: str | None = None, max_samples: int | None = None) -> RecordSet:
    """[{"image": "a.jpg", "caption": "..." or ["...", ...], "label": 3?}, ...] (or the same as JSON lines)."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path.name} must hold a JSON list of {{'image': ..., 'caption': ...}} objects")
    items = [d for d in data if isinstance(d, dict)]
    if not items:
        raise DataError(f"{path.name} holds no {{'image': ..., 'caption': ...}} objects")
    if _first_key(items[0], _IMAGE_KEYS) is None or _first_key(items[0], _CAPTION_KEYS) is None:
        raise DataError(f"{path.name}: items need an image key {_IMAGE_KEYS} and a caption key {_CAPTION_KEYS}; "
                        f"the first has {sorted(items[0])}")
    names = [str(_first_key(d, _IMAGE_KEYS)) for d in items[:200]]
    root = resolve_images_root(path, images_root, names)
    builder = RecordBuilder(max_samples)
    for d in items:
        name, cap = _first_key(d, _IMAGE_KEYS), _first_key(d, _CAPTION_KEYS)
        if name is None or cap is None:
            continue
        captions = [str(c) for c in cap] if isinstance(cap, list) else [str(cap)]
        label = d.get("label")
        builder.add(str(name), image_path(root, str(name)), captions, label=label if isinstance(label, int) else None)
    return RecordSet(path.stem, builder.build())


def strip_image_token(text: str) -> str:
    """Remove LLaVA's "<image>" placeholder wherever it stands and tidy the whitespace left behind."""
    return " ".join(_IMAGE_TOKEN.sub(" ", text).split())


def llava_caption(conversations: Any) -> str | None:
    """The first "gpt" turn of a LLaVA conversation, which in the pretraining set is the BLIP caption."""
    if not isinstance(conversations, list):
        return None
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
            return strip_image_token(turn["value"])
    return None


def load_llava(path: Path, images_root: str | None = None, max_samples: int | None = None) -> RecordSet:
    """LLaVA-Pretrain blip_laion_cc_sbu_558k.json: {"image": "00453/004539375.jpg", "conversations": [...]}."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path.name} must hold a JSON list of LLaVA records")
    items = [d for d in data if isinstance(d, dict) and d.get("image") and "conversations" in d]
    if not items:
        raise DataError(f"{path.name} has no records with 'image' and 'conversations'")
    root = resolve_images_root(path, images_root, [str(d["image"]) for d in items[:200]])
    builder = RecordBuilder(max_samples)
    for d in items:
        cap = llava_caption(d["conversations"])
        if cap:
            builder.add(str(d["image"]), image_path(root, str(d["image"])), cap)
    return RecordSet(path.stem, builder.build())


def load_coco(path: Path, images_root: str | None = None, max_samples: int | None = None) -> RecordSet:
    """COCO captions (captions_train2017.json): "images" [{id, file_name}] + "annotations" [{image_id, caption}].

    Images go in the order of the "images" list, each with all its captions; without
    images_root the folder named after the split (train2017 beside annotations/) is tried.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path.name} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    files: dict[Any, str] = {}
    for im in data["images"]:
        if isinstance(im, dict) and "id" in im and im.get("file_name"):
            files[im["id"]] = str(im["file_name"])
    caps: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and ann.get("image_id") in files and isinstance(ann.get("caption"), str):
            caps.setdefault(ann["image_id"], []).append(ann["caption"])
    if not caps:
        raise DataError(f"{path.name} has no captions that refer to a listed image")
    split = path.stem.split("_")[-1]  # captions_val2017 -> val2017
    extra = (path.parent / split, path.parent.parent / split, path.parent.parent / "images" / split)
    ordered = [i for i in files if i in caps]
    root = resolve_images_root(path, images_root, [files[i] for i in ordered[:200]], extra_candidates=extra)
    builder = RecordBuilder(max_samples)
    for i in ordered:
        if not builder.add(files[i], image_path(root, files[i]), caps[i]):
            break
    return RecordSet(path.stem, builder.build())
