"""A byte-level BPE tokenizer trained with Hugging Face `tokenizers` on captions.

Byte-level means every string (emoji, CJK, control characters) has an encoding, so
encoding never fails; training gives the special tokens ids 0-2 to match CLIPConfig's defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, SOT, EOT]  # ids 0, 1, 2
# Longer inputs are cut (in characters, after normalising) before BPE: 64 tokens never
# need more, and it keeps a 1 MB query from costing a 1 MB BPE pass.
_MAX_CHARS_PER_TOKEN = 64
# How far into a long input the normaliser may read looking for text (whitespace runs
# collapse to nothing); past this, the rest is ignored so any query stays cheap.
_MAX_SCAN_CHARS = 1_000_000


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
        from tokenizers import Regex

        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps) if steps else None


class CLIPTokenizer:
    """Captions in, right-padded (B, T) id tensors out, each row `<sot> ... <eot> <pad>*`."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        if max_length < 3:
            raise ValueError("max_length must be at least 3 (start, one token, end)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        # Read the special ids rather than assume 0-2, so a checkpoint whose tokenizer and
        # config disagree is reported by the config field (see checkpoint.check_tokenizer).
        ids = [tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS]
        for tok, i in zip(SPECIAL_TOKENS, ids):
            if i is None:
                raise ValueError(f"tokenizer has no {tok} token")
        if len(set(ids)) != 3:
            raise ValueError("tokenizer's pad, start and end tokens must have distinct ids")
        self.pad_id, self.sot_id, self.eot_id = ids
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, self.sot_id), (EOT, self.eot_id)]
        )
        # Truncation counts the two added specials, so EOT always survives.
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=PAD)

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

    def _head(self, text: str) -> str:
        """The start of `text` that can fill max_length tokens, cut after normalising.

        Cutting the raw string would let what the normaliser removes (2000 leading spaces)
        use up the budget. The window doubles until its normalised form is long enough, so
        the work stays proportional to the text actually kept.
        """
        cut = self.max_length * _MAX_CHARS_PER_TOKEN
        norm = self.tokenizer.normalizer
        if len(text) <= cut or norm is None:
            return clean_text(text[:cut])
        window = cut
        while True:
            head = norm.normalize_str(clean_text(text[:window]))
            if len(head) >= cut or window >= min(len(text), _MAX_SCAN_CHARS):
                return head[:cut]  # normalising it again in encode_batch changes nothing
            window = min(2 * window, _MAX_SCAN_CHARS)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ persistence
    def to_str(self) -> str:
        data = json.loads(self.tokenizer.to_str())
        data["clipforge"] = {"max_length": self.max_length}
        return json.dumps(data, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    @classmethod
    def from_str(cls, text: str) -> CLIPTokenizer:
        data = json.loads(text)
        extra = data.pop("clipforge", {})
        tok = Tokenizer.from_str(json.dumps(data))
        return cls(tok, int(extra.get("max_length", 64)))

    @classmethod
    def load(cls, path: str | Path) -> CLIPTokenizer:
        return cls.from_str(Path(path).read_text(encoding="utf-8"))
