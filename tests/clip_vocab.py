"""CLIP's real BPE vocabulary for tests, from the open_clip wheel that `make install` keeps.

Tests that need it skip (with the reason) when the wheel is absent; nothing is downloaded.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from model.tokenizer import clip_bpe_from_merges_file

WHEELS = Path(__file__).resolve().parents[1] / ".cache" / "wheels"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def clip_bpe(tmp_dir: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's 49,408-token BPE, built as CLIP builds them; skips if the wheel is missing."""
    wheels = sorted(WHEELS.glob("open_clip_torch-*.whl"))
    if not wheels:
        pytest.skip(f"CLIP's BPE vocabulary needs an open_clip_torch wheel in {WHEELS} (make install keeps one)")
    gz = tmp_dir / "bpe_simple_vocab_16e6.txt.gz"
    with zipfile.ZipFile(wheels[-1]) as zf:
        gz.write_bytes(zf.read(MEMBER))
    return clip_bpe_from_merges_file(gz)


def write_vocab_and_merges(directory: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """vocab.json and merges.txt as the hub lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
