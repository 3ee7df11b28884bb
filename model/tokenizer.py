"""Byte-level BPE tokenizers on Hugging Face `tokenizers`: trained on captions, or CLIP's own.

Byte-level means every string (emoji, CJK, control characters) has an encoding, so
encoding never fails; training gives the special tokens ids 0-2 to match CLIPConfig's defaults.
CLIP's pretrained 49,408-token BPE (`</w>` word ends, its lowercase and regex split) is built
from vocab.json + merges.txt or a transformers tokenizer.json, with the ids transformers gives.
A tokenizer may also clean text as open_clip's does before any of that (cleaning="open_clip":
ftfy, HTML entities), so an imported open_clip model reads the ids it was trained on.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, SOT, EOT]  # ids 0, 1, 2
# CLIP's vocabulary has no pad token; like open_clip, rows are padded with id 0 ("!"). The
# text tower is causal and pools at the first EOT, so what follows EOT never matters.
CLIP_PAD = "!"
CLIP_CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
# OpenAI CLIP's pre-tokeniser split (transformers' CLIPTokenizer uses the same pattern).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Longer inputs are cut (in characters, after normalising) before BPE: 64 tokens never
# need more, and it keeps a 1 MB query from costing a 1 MB BPE pass.
_MAX_CHARS_PER_TOKEN = 64
# How far into a long input the normaliser may read looking for text (whitespace runs
# collapse to nothing); past this, the rest is ignored so any query stays cheap.
_MAX_SCAN_CHARS = 1_000_000
# What a tokenizer does to text before its normaliser: "none", or "open_clip": open_clip's tokenizer
# cleaning (open_clip_clean). Stored in the tokenizer file; files without the key read as "none".
TEXT_CLEANINGS = ("none", "open_clip")


@functools.cache
def _ftfy() -> ModuleType:
    try:
        import ftfy
    except ImportError as exc:  # a core dependency; a broken install is said in one line
        raise RuntimeError("open_clip's text cleaning needs ftfy: pip install ftfy") from exc
    return ftfy


def open_clip_clean(text: str) -> str:
    """open_clip's tokenizer cleaning (its default "lower"), step for step: ftfy.fix_text (mojibake,
    ligatures, curly quotes), html.unescape twice, strip, whitespace runs to one space, lowercase."""
    text = html.unescape(html.unescape(_ftfy().fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def clean_text(text: str) -> str:
    """Make any Python str encodable: lone surrogates (invalid UTF-8) become U+FFFD.

    A UTF-16 round trip also joins surrogate pairs that arrived as two code units.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _normalizer(lowercase: bool, nfc: bool, collapse_whitespace: bool) -> normalizers.Normalizer | None:
    steps: list[normalizers.Normalizer] = []
    if nfc:
        steps.append(normalizers.NFC())
    if lowercase:
        steps.append(normalizers.Lowercase())
    if collapse_whitespace:
        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps) if steps else None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map of the 256 byte values to printable characters, in CLIP's vocabulary order.

    Printable bytes map to themselves and come first; the rest follow as chr(256 + n).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + len(chars) - len(printable))
    return chars


def clip_bpe_from_merges_file(path: str | Path) -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines from OpenAI's bpe_simple_vocab_16e6.txt(.gz), as CLIP builds them.

    The vocabulary is the 256 byte characters, the same with `</w>`, the first 48,894 merges
    joined, then the start and end tokens: 49,408 in all.
    """
    raw = Path(path).read_bytes()
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    merges = text.split("\n")[1 : 1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPTokenizer:
    """Captions in, right-padded (B, T) id tensors out, each row `<sot> ... <eot> <pad>*`."""

    def __init__(
        self, tokenizer: Tokenizer, max_length: int, *, pad_token: str = PAD, sot_token: str = SOT,
        eot_token: str = EOT, cleaning: str = "none",
    ) -> None:
        if max_length < 3:
            raise ValueError("max_length must be at least 3 (start, one token, end)")
        if cleaning not in TEXT_CLEANINGS:
            raise ValueError(f"cleaning must be one of {', '.join(map(repr, TEXT_CLEANINGS))}, got {cleaning!r}")
        if cleaning == "open_clip":
            _ftfy()  # a missing ftfy is said when the tokenizer loads, not at its first text
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cleaning = cleaning
        self.special_tokens = (pad_token, sot_token, eot_token)
        # Read the special ids rather than assume 0-2, so a checkpoint whose tokenizer and
        # config disagree is reported by the config field (see checkpoint.check_tokenizer).
        ids = [tokenizer.token_to_id(tok) for tok in self.special_tokens]
        for tok, i in zip(self.special_tokens, ids):
            if i is None:
                raise ValueError(f"tokenizer has no {tok} token")
        if len(set(ids)) != 3:
            raise ValueError("tokenizer's pad, start and end tokens must have distinct ids")
        self.pad_id, self.sot_id, self.eot_id = ids
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{sot_token} $A {eot_token}", special_tokens=[(sot_token, self.sot_id), (eot_token, self.eot_id)]
        )
        # Truncation counts the two added specials, so EOT always survives.
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=pad_token)

    # ------------------------------------------------------------------ CLIP's pretrained BPE
    @classmethod
    def from_clip_bpe(
        cls, vocab: dict[str, int], merges: list[str], max_length: int = CLIP_CONTEXT_LENGTH,
    ) -> CLIPTokenizer:
        """CLIP's tokenizer from vocab.json's mapping and merges.txt's lines (a "#version" header is skipped).

        The same pipeline transformers' CLIPTokenizer builds: NFC, whitespace runs to one
        space, lowercase; CLIP's regex split; byte-level BPE with `</w>` ending each word.
        """
        merge_pairs = [tuple(m.split()) for m in merges if m.strip() and not m.startswith("#version")]
        if any(len(p) != 2 for p in merge_pairs):
            raise ValueError("merges must be lines of two space-separated symbols")
        for tok in (SOT, EOT, CLIP_PAD):
            if tok not in vocab:
                raise ValueError(f"vocabulary has no {tok} token: not CLIP's BPE")
        tok = Tokenizer(models.BPE(
            vocab=dict(vocab), merges=merge_pairs, continuing_subword_prefix="", end_of_word_suffix="</w>",
            fuse_unk=False, unk_token=EOT,
        ))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([SOT, EOT])
        return cls(tok, max_length, pad_token=CLIP_PAD)

    @classmethod
    def from_tokenizer_json(
        cls, text: str, max_length: int = CLIP_CONTEXT_LENGTH, *, pad_token: str = CLIP_PAD, sot_token: str = SOT,
        eot_token: str = EOT,
    ) -> CLIPTokenizer:
        """A transformers tokenizer.json (CLIP's BPE) as it is: its normaliser, split and model are kept."""
        tok = Tokenizer.from_str(text)
        tok.no_truncation()
        tok.no_padding()
        return cls(tok, max_length, pad_token=pad_token, sot_token=sot_token, eot_token=eot_token)

    def with_cleaning(self, cleaning: str) -> CLIPTokenizer:
        """The same tokenizer cleaning text as `cleaning` says (TEXT_CLEANINGS) before its normaliser."""
        pad, sot, eot = self.special_tokens
        return CLIPTokenizer(self.tokenizer, self.max_length, pad_token=pad, sot_token=sot, eot_token=eot,
                             cleaning=cleaning)

    @property
    def end_of_word_suffix(self) -> str:
        """`</w>` for CLIP's BPE, "" for the trained byte-level ones."""
        return getattr(self.tokenizer.model, "end_of_word_suffix", None) or ""

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 6400, max_length: int = 64, *, lowercase: bool = True,
        nfc: bool = True, collapse_whitespace: bool = True, min_frequency: int = 2,
    ) -> CLIPTokenizer:
        tok = Tokenizer(models.BPE())
        norm = _normalizer(lowercase, nfc, collapse_whitespace)
        if norm is not None:
            tok.normalizer = norm
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
        return cls(tok, max_length)

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: str | list[str]) -> torch.Tensor:
        """Right-padded ids (B, T), T = the longest row (<= max_length). Thread-safe."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.zeros((0, 2), dtype=torch.long)
        encodings = self.tokenizer.encode_batch([self._head(t) for t in texts])
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def _clean(self, text: str) -> str:
        text = clean_text(text)
        return open_clip_clean(text) if self.cleaning == "open_clip" else text

    def _head(self, text: str) -> str:
        """The start of `text` that can fill max_length tokens, cut after normalising.

        Cutting the raw string would let what the normaliser removes (2000 leading spaces)
        use up the budget. The window doubles until its normalised form is long enough, so
        the work stays proportional to the text actually kept. (open_clip cleans a whole
        text; a window of one cleans only its start, which is all the ids can hold.)
        """
        cut = self.max_length * _MAX_CHARS_PER_TOKEN
        norm = self.tokenizer.normalizer
        if len(text) <= cut or norm is None:
            return self._clean(text[:cut])
        window = cut
        while True:
            head = norm.normalize_str(self._clean(text[:window]))
            if len(head) >= cut or window >= min(len(text), _MAX_SCAN_CHARS):
                return head[:cut]  # normalising it again in encode_batch changes nothing
            window = min(2 * window, _MAX_SCAN_CHARS)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.end_of_word_suffix:  # CLIP pads with an ordinary token ("!"): drop everything after EOT
            ids = ids[: ids.index(self.eot_id)] if self.eot_id in ids else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.end_of_word_suffix:
            text = " ".join(text.replace(self.end_of_word_suffix, " ").split())
        return text.strip()

    # ------------------------------------------------------------------ persistence
    def to_str(self) -> str:
        data = json.loads(self.tokenizer.to_str())
        extra: dict[str, object] = {"max_length": self.max_length}
        if self.special_tokens != (PAD, SOT, EOT):  # older checkpoints have the defaults and no such keys
            extra.update(zip(("pad_token", "sot_token", "eot_token"), self.special_tokens))
        if self.cleaning != "none":  # likewise
            extra["cleaning"] = self.cleaning
        data["clipforge"] = extra
        return json.dumps(data, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    @classmethod
    def from_str(cls, text: str) -> CLIPTokenizer:
        data = json.loads(text)
        extra = data.pop("clipforge", {})
        tok = Tokenizer.from_str(json.dumps(data))
        return cls(
            tok, int(extra.get("max_length", 64)), pad_token=extra.get("pad_token", PAD),
            sot_token=extra.get("sot_token", SOT), eot_token=extra.get("eot_token", EOT),
            cleaning=extra.get("cleaning", "none"),
        )

    @classmethod
    def load(cls, path: str | Path) -> CLIPTokenizer:
        return cls.from_str(Path(path).read_text(encoding="utf-8"))
