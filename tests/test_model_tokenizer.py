"""The byte-level BPE tokenizer: round trip, padding, truncation keeping EOT, any input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import CLIPTokenizer
from model.tokenizer import EOT, PAD, SOT

CAPTIONS = [
    f"a {size}{color} {shape} on a {bg} background"
    for size in ("", "small ", "big ")
    for color in ("red", "blue", "green", "yellow")
    for shape in ("circle", "square", "triangle")
    for bg in ("white", "black")
]

ODD_TEXTS = [
    "",
    "   ",
    "🐱🐶 emoji 👩‍👩‍👧‍👦 family",
    "一只红色的猫坐在桌子上",
    "control \x00 nul \x01\x02\x1b[31m \x7f chars",
    "lone surrogates \ud800 and \udfff here",
    "tabs\tand\nnewlines\r\n",
    "مرحبا بالعالم",
    "x" * 100_000,
    "word " * 20_000,
    " " * 2000 + "a red circle",
    "\n" * 1_000_000 + "a red circle",
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.train(CAPTIONS * 3, vocab_size=300, max_length=16)


@pytest.fixture(scope="module")
def raw_tok() -> CLIPTokenizer:
    """No normalisation at all: decode(encode(x)) must give x back exactly."""
    return CLIPTokenizer.train(CAPTIONS * 3, vocab_size=300, max_length=512, lowercase=False, nfc=False,
                               collapse_whitespace=False)


def test_special_tokens_have_fixed_ids(tok: CLIPTokenizer) -> None:
    assert [tok.tokenizer.token_to_id(t) for t in (PAD, SOT, EOT)] == [0, 1, 2]
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    assert tok.vocab_size <= 300


def test_batch_encoding_is_right_padded_with_sot_and_eot(tok: CLIPTokenizer) -> None:
    ids = tok.encode(["a red circle", "a big yellow triangle on a black background", "blue"])
    assert ids.dtype == torch.long and ids.ndim == 2 and ids.shape[0] == 3
    for row in ids.tolist():
        assert row[0] == 1
        end = row.index(2)
        assert all(t == 0 for t in row[end + 1 :])
        assert all(t > 2 for t in row[1:end])
    lengths = [row.index(2) for row in ids.tolist()]
    assert ids.shape[1] == max(lengths) + 1  # padded to the longest row, not to max_length
    assert tok.encode("a red circle").tolist() == ids[:1, : lengths[0] + 1].tolist()
    assert tok.encode([]).shape == (0, 2)


def test_round_trip_with_normalisation(tok: CLIPTokenizer) -> None:
    for text in ["A Red  Circle", "a small green square", "Café au lait"]:
        assert tok.decode(tok.encode(text)[0]) == " ".join(text.lower().split())


@pytest.mark.parametrize("text", [t for t in ODD_TEXTS if len(t) < 1000 and t.strip() == t and "\ud800" not in t])
def test_round_trip_is_exact_without_normalisation(raw_tok: CLIPTokenizer, text: str) -> None:
    ids = raw_tok.encode(text)
    assert raw_tok.decode(ids[0]) == text
    assert raw_tok.decode(ids[0].tolist()) == text


def test_truncation_keeps_eot(tok: CLIPTokenizer) -> None:
    long_caption = " ".join(CAPTIONS[:10])
    ids = tok.encode([long_caption, "a red circle"])
    assert ids.shape == (2, 16)
    assert ids[0, 0].item() == 1 and ids[0, -1].item() == 2
    assert (ids[0] == 2).sum() == 1 and (ids[0] == 0).sum() == 0
    # The kept text is a prefix of the caption.
    assert " ".join(long_caption.split()).startswith(tok.decode(ids[0]))


@pytest.mark.parametrize("text", ODD_TEXTS, ids=lambda t: repr(t[:12]))
def test_odd_inputs_encode_without_error(tok: CLIPTokenizer, text: str) -> None:
    ids = tok.encode([text, "a red circle"])
    row = ids[0].tolist()
    assert row[0] == 1 and 2 in row and len(row) <= 16
    assert max(row) < tok.vocab_size


def test_lone_surrogates_become_replacement_characters(raw_tok: CLIPTokenizer) -> None:
    assert raw_tok.decode(raw_tok.encode("a\ud800b")[0]) == "a\ufffdb"


def test_save_load_and_string_round_trip(tok: CLIPTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = CLIPTokenizer.load(path)
    assert again.max_length == 16 and again.vocab_size == tok.vocab_size
    texts = ["a Big red circle", "🐱 一只猫", "x" * 500]
    assert torch.equal(again.encode(texts), tok.encode(texts))
    assert torch.equal(CLIPTokenizer.from_str(tok.to_str()).encode(texts), tok.encode(texts))


def test_training_is_deterministic(tok: CLIPTokenizer) -> None:
    other = CLIPTokenizer.train(CAPTIONS * 3, vocab_size=300, max_length=16)
    assert other.to_str() == tok.to_str()


def test_too_short_max_length_is_refused() -> None:
    with pytest.raises(ValueError, match="max_length must be at least 3"):
        CLIPTokenizer.train(CAPTIONS, vocab_size=300, max_length=2)


def test_nfc_normalisation_makes_composed_and_decomposed_forms_equal(tok: CLIPTokenizer,
                                                                    raw_tok: CLIPTokenizer) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert torch.equal(tok.encode(composed), tok.encode(decomposed))
    assert not torch.equal(raw_tok.encode(composed), raw_tok.encode(decomposed))
    assert torch.equal(tok.encode("A  RED\tcircle"), tok.encode("a red circle"))


@pytest.mark.parametrize("pad", [" " * 2000, "\t \n" * 50_000, " " * 900_000])
def test_whitespace_before_the_text_does_not_use_up_the_budget(tok: CLIPTokenizer, pad: str) -> None:
    expected = tok.encode("a red circle")
    assert torch.equal(tok.encode(pad + "a red circle"), expected)
    mixed = tok.encode([pad + "A  Red " + "\n" * 5000 + "circle", "blue"])
    assert torch.equal(mixed[:1, : expected.shape[1]], expected)


def test_long_text_is_still_cut_to_max_length(tok: CLIPTokenizer, raw_tok: CLIPTokenizer) -> None:
    long = " ".join(["a big red circle"] * 30_000)
    ids = tok.encode(long)
    assert ids.shape == (1, 16) and ids[0, -1].item() == 2
    assert tok.decode(ids[0]) == tok.decode(tok.encode(long[:200])[0])
    # Without whitespace normalisation, spaces are text: they fill the context as before.
    assert raw_tok.decode(raw_tok.encode(" " * 2000 + "a red circle")[0]).strip() == ""
    # The normaliser reads at most a million characters looking for text: the cost stays bounded.
    assert tok.encode(" " * 2_000_000 + "a red circle").tolist() == [[1, 2]]


# --------------------------------------------------------------------------- CLIP's pretrained BPE
TRICKY_TEXTS = [
    "A photo of a CAT.",
    "Café crème brûlée, naïve façade; déjà vu",
    "cafe\u0301 (decomposed accent)",
    "🐱🐶 emoji 👩‍👩‍👧‍👦 family 🇫🇷",
    "   leading, trailing   and\t\ttabbed\n\nwhitespace runs   ",
    "numbers 12345 3.14159 1,000,000 and 2nd 21st",
    "don't you're we've I'm they'll he'd it's DON'T",
    "punctuation!!! ?? ... ;;; (brackets) [x] {y} <html> &amp; #tag @user",
    "一只红色的猫坐在桌子上",
    "ÀÉÎÕÜ İSTANBUL straße ǅ",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 3,
    " ".join(f"word{i}" for i in range(200)),  # truncated at 77
    "",
]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, int], list[str], Path]:
    from clip_vocab import clip_bpe, write_vocab_and_merges

    tmp = tmp_path_factory.mktemp("clip_bpe")
    vocab, merges = clip_bpe(tmp)
    write_vocab_and_merges(tmp / "hf", vocab, merges)
    return vocab, merges, tmp / "hf"


def _ids_to_eot(tok: CLIPTokenizer, text: str) -> list[int]:
    row = tok.encode(text)[0].tolist()
    return row[: row.index(tok.eot_id) + 1]


def test_clip_bpe_vocabulary_is_clips(clip_files) -> None:
    vocab, merges, _ = clip_files
    assert len(vocab) == 49408 and len(merges) == 48894
    assert (vocab["!"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 49406, 49407)
    assert vocab["a</w>"] == 256 + ord("a") - ord("!")
    tok = CLIPTokenizer.from_clip_bpe(vocab, merges)
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.max_length, tok.vocab_size) == (49406, 49407, 0, 77, 49408)


def test_clip_bpe_ids_equal_transformers(clip_files) -> None:
    transformers = pytest.importorskip("transformers")
    vocab, merges, hf_dir = clip_files
    theirs = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    theirs.save_pretrained(str(hf_dir.parent / "saved"))  # transformers writes tokenizer.json
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(hf_dir.parent / "saved"))
    ours = CLIPTokenizer.from_clip_bpe(vocab, merges)
    from_json = CLIPTokenizer.from_tokenizer_json((hf_dir.parent / "saved" / "tokenizer.json").read_text("utf-8"))
    for text in TRICKY_TEXTS:
        expected = theirs(text, truncation=True, max_length=77)["input_ids"]
        assert fast(text, truncation=True, max_length=77)["input_ids"] == expected
        assert _ids_to_eot(ours, text) == expected, text
        assert _ids_to_eot(from_json, text) == expected, text
    long = ours.encode(TRICKY_TEXTS[-2])
    assert long.shape == (1, 77) and long[0, -1].item() == 49407
    batch = ours.encode(["a dog", "A DOG on the beach"])
    assert batch[0].tolist()[3:] == [49407] + [0] * (batch.shape[1] - 4)  # padded with id 0, like open_clip


def test_clip_bpe_survives_save_and_load(clip_files) -> None:
    vocab, merges, _ = clip_files
    ours = CLIPTokenizer.from_clip_bpe(vocab, merges)
    again = CLIPTokenizer.from_str(ours.to_str())
    assert (again.pad_id, again.sot_id, again.eot_id, again.max_length) == (0, 49406, 49407, 77)
    assert torch.equal(again.encode(TRICKY_TEXTS), ours.encode(TRICKY_TEXTS))
    assert again.decode(again.encode("Hello, World! Café")[0]) == "hello , world ! café"


# --------------------------------------------------------------------------- open_clip's text cleaning
def test_open_clip_cleaning_unescapes_html_and_fixes_mojibake(clip_files) -> None:
    """What open_clip's tokenizer does before BPE; without the option the ids are transformers' (tested above)."""
    vocab, merges, _ = clip_files
    plain = CLIPTokenizer.from_clip_bpe(vocab, merges)
    cleaning = plain.with_cleaning("open_clip")
    assert (plain.cleaning, cleaning.cleaning) == ("none", "open_clip")
    for dirty, clean in [("Tom &amp; Jerry &lt;3", "tom & jerry <3"), ("donâ€™t ﬁne", "don't fine"),
                         ("&amp;amp; twice", "& twice"), ("  A\u3000DOG\t on the BEACH  ", "a dog on the beach")]:
        assert _ids_to_eot(cleaning, dirty) == _ids_to_eot(plain, clean), dirty
        if dirty != dirty.strip():
            continue  # whitespace the plain tokenizer collapses as well
        assert _ids_to_eot(plain, dirty) != _ids_to_eot(plain, clean), dirty
    for text in TRICKY_TEXTS[:3] + TRICKY_TEXTS[5:7]:  # text that needs no fixing reads the same either way
        assert _ids_to_eot(cleaning, text) == _ids_to_eot(plain, text), text


def test_open_clip_cleaning_is_kept_in_the_tokenizer_file(clip_files, tmp_path: Path) -> None:
    vocab, merges, _ = clip_files
    plain = CLIPTokenizer.from_clip_bpe(vocab, merges)
    assert "cleaning" not in json.loads(plain.to_str())["clipforge"]  # files of earlier versions, unchanged
    assert CLIPTokenizer.from_str(plain.to_str()).cleaning == "none"
    cleaning = plain.with_cleaning("open_clip")
    cleaning.save(tmp_path / "tokenizer.json")
    again = CLIPTokenizer.load(tmp_path / "tokenizer.json")
    assert again.cleaning == "open_clip"
    assert again.encode("Tom &amp; Jerry").tolist() == cleaning.encode("Tom &amp; Jerry").tolist()
    with pytest.raises(ValueError, match="cleaning must be one of 'none', 'open_clip'"):
        plain.with_cleaning("nfkc")


def test_open_clip_cleaning_of_long_text_stays_bounded(clip_files) -> None:
    vocab, merges, _ = clip_files
    cleaning = CLIPTokenizer.from_clip_bpe(vocab, merges).with_cleaning("open_clip")
    ids = cleaning.encode(" " * 100_000 + "Tom &amp; Jerry " * 20_000)
    assert ids.shape == (1, 77) and ids[0, -1].item() == cleaning.eot_id
    assert ids[0, :4].tolist() == _ids_to_eot(cleaning, "tom & jerry")[:4]
