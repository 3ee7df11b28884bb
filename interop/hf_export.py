"""`model export CKPT --to hf:DIR`: a checkpoint as a folder transformers loads with CLIPModel,
CLIPTokenizer and CLIPImageProcessor, or one line naming what it cannot express.

What the weights compute always exports exactly. Two preprocessing choices of an imported
open_clip model do not: its rounded centre-crop offset and its text cleaning. Such a model
still exports (the folder is what open_clip's own hub conversions give transformers), and the
export says so: NOTES_FILE's "not_reproduced" lists each difference and the CLI prints them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from interop.hf_mapping import (
    hf_config,
    load_transformers,
    preprocessor_config,
    state_to_hf,
)
from model.checkpoint import load_checkpoint
from model.clip import CLIP
from model.config import CLIPConfig
from model.errors import ConfigError
from model.fileio import publish_directory
from model.tokenizer import EOT, SOT, CLIPTokenizer


def check_exportable(model: CLIP, tokenizer: CLIPTokenizer) -> None:
    """Refuse, naming the field, what a transformers CLIPModel cannot express."""
    cfg = model.cfg
    refusals = [
        (cfg.text_pos != "learned", f"text_pos {cfg.text_pos!r}: rotary positions have no transformers CLIP equivalent"),
        (cfg.text_n_kv_heads != cfg.text_n_heads,
         (f"text_n_kv_heads {cfg.text_n_kv_heads} < text_n_heads {cfg.text_n_heads}: grouped-query attention has "
          "no transformers CLIP equivalent")),
        (cfg.img_color_layer is not None, "img_color_layer: the colour-split stem has no transformers CLIP equivalent"),
        (cfg.img_stem != "patch", f"img_stem {cfg.img_stem!r}: the convolutional stem has no transformers CLIP equivalent"),
        (cfg.img_pool != "cls", f"img_pool {cfg.img_pool!r}: transformers CLIP pools the CLS token"),
        (cfg.num_classes is not None, "num_classes: a classification head has no place in a transformers CLIPModel"),
        (tokenizer.end_of_word_suffix != "</w>" or (tokenizer.special_tokens[1:] != (SOT, EOT)),
         ("tokenizer: transformers' CLIPTokenizer rebuilds CLIP's BPE pipeline, so only CLIP's BPE tokenizer "
          "(an imported model's) exports; this one is clipforge's trained byte-level BPE")),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"cannot export to transformers: {why}")


def _write_tokenizer(tokenizer: CLIPTokenizer, cfg: CLIPConfig, out: Path) -> None:
    """vocab.json + merges.txt (what every transformers version reads) and the tokenizer config."""
    data = json.loads(tokenizer.tokenizer.to_str())
    vocab = data["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": cfg.max_seq_len}, indent=2),
        encoding="utf-8")


_PROBE_TEXTS = ("a photo of a dog.", "Two CATS, sleeping on a sofa!", "café 123 🐱 don't")
NOTES_FILE = "clipforge_source.json"


def not_reproduced(model: CLIP, tokenizer: CLIPTokenizer) -> list[str]:
    """What transformers' CLIPImageProcessor and CLIPTokenizer will do differently from clipforge, one line each."""
    notes = []
    if model.cfg.image_crop_offset != "floor":
        notes.append(f"image_crop_offset {model.cfg.image_crop_offset!r}: transformers' CLIPImageProcessor floors "
                     "the centre-crop offset, so on an odd margin whose half rounds up (15 pixels: 7 against 8) "
                     "its crop sits one pixel before clipforge's (open_clip's)")
    if tokenizer.cleaning != "none":
        notes.append(f"tokenizer cleaning {tokenizer.cleaning!r}: transformers' CLIPTokenizer does not unescape "
                     "HTML (nor, in its tokenizers form, run ftfy), so texts with entities (&amp;) or mojibake "
                     "get other ids than clipforge's")
    return notes


def read_notes(out_dir: str | Path) -> list[str]:
    """The "not_reproduced" lines an export folder records (none for folders from before they were kept)."""
    path = Path(out_dir) / NOTES_FILE
    notes = json.loads(path.read_text(encoding="utf-8")).get("not_reproduced") if path.is_file() else None
    return [str(n) for n in notes] if isinstance(notes, list) else []


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint as a folder transformers loads with CLIPModel, CLIPTokenizer and CLIPImageProcessor.

    The folder is built aside and published in one rename; its tokenizer is checked
    against clipforge's on probe texts before it is.
    """
    model, tokenizer, meta = load_checkpoint(ckpt)
    check_exportable(model, tokenizer)
    transformers = load_transformers()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_model = transformers.CLIPModel(hf_config(model.cfg, tokenizer)).eval()
        hf_model.load_state_dict(state_to_hf(model), strict=True)
        hf_model.save_pretrained(str(tmp))
        _write_tokenizer(tokenizer, model.cfg, tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model.cfg), indent=2),
                                                      encoding="utf-8")
        theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp))
        for text in _PROBE_TEXTS:
            ours = tokenizer.encode(text)[0].tolist()
            if theirs(text, truncation=True, max_length=model.cfg.max_seq_len)["input_ids"] != ours[: ours.index(
                    tokenizer.eot_id) + 1]:
                raise ConfigError(f"cannot export to transformers: its CLIPTokenizer splits {text!r} differently")
        notes = {"content_hash": meta.get("content_hash"), "source": meta.get("source"),
                 "not_reproduced": not_reproduced(model, tokenizer)}
        (tmp / NOTES_FILE).write_text(json.dumps(notes, indent=2), encoding="utf-8")
        publish_directory(tmp, out)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
