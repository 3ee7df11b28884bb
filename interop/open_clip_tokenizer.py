"""CLIP's BPE tokenizer files for a converted open_clip model: the source's own, or built from
open_clip's (OpenAI's) bpe_simple_vocab_16e6.txt.gz.
"""

from __future__ import annotations

import json
from pathlib import Path

from interop.open_clip_archs import (
    BPE_NAME,
    CONTEXT_LENGTH,
    EOT,
    SOT,
    VOCAB_SIZE,
    OpenClipError,
)
from model.tokenizer import clip_bpe_from_merges_file


def clip_bpe_files(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines from open_clip's (OpenAI's) BPE file."""
    try:
        vocab, merges = clip_bpe_from_merges_file(bpe_gz)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise OpenClipError(f"{bpe_gz}: not CLIP's gzipped BPE merges ({exc})") from exc
    if len(vocab) != VOCAB_SIZE:
        raise OpenClipError(f"{bpe_gz}: gives {len(vocab)} tokens, CLIP's BPE has {VOCAB_SIZE}")
    return vocab, merges


def _find_bpe(folder: Path | None) -> Path | None:
    if folder is not None and (folder / BPE_NAME).is_file():
        return folder / BPE_NAME
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / BPE_NAME
        if candidate.is_file():
            return candidate
    return None


def write_tokenizer(folder: Path | None, out: Path) -> str:
    """CLIP's tokenizer files into out: the source's own where it has them, else built from the BPE file."""
    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            (out / name).write_bytes((folder / name).read_bytes())
        source = "the source's vocab.json + merges.txt"
    elif folder is not None and (folder / "tokenizer.json").is_file():
        (out / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
        source = "the source's tokenizer.json"
    else:
        bpe = _find_bpe(folder)
        if bpe is None:
            raise OpenClipError(
                f"no CLIP tokenizer files beside the weights: put vocab.json + merges.txt (or open_clip's {BPE_NAME}) "
                f"in {folder}"
            )
        vocab, merges = clip_bpe_files(bpe)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        source = str(bpe)
    special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, **special}),
        encoding="utf-8",
    )
    return source
