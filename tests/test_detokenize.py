"""Incremental detokenization: the streamed pieces add up to the full decode, for tokenizers whose
decode is not plain concatenation, and each token decodes a bounded window, not the whole output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from conftest import HF_FIXTURES

from checkpoints.tokenizer import ByteTokenizer, HFTokenizer
from crosspool_jax.detokenize import IncrementalDetokenizer


class Counting:
    """Wraps a tokenizer; records the length of every decode call."""

    def __init__(self, tok):
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids: Sequence[int]) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


class Wrapped:
    """A `tokenizers.Tokenizer` with the engine's decode(ids) signature."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def stream(tok, ids: Sequence[int]) -> list[str]:
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(t) for t in ids]
    pieces[-1] += d.flush()
    return pieces


def trained_tokenizers() -> tuple[dict[str, object], list[str]]:
    """A byte-level BPE (GPT-2 style) and a metaspace BPE (SentencePiece style), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["Grüße aus Köln 🚀 — naïve café, 東京タワー", "the quick brown fox jumps over the lazy dog",
            "ça coûte 5€ ; ¿qué tal? 😀😀 Ωμέγα"] * 20
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    metaspace.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    return {"byte-level BPE": byte_level, "metaspace BPE": metaspace}, text


@pytest.mark.parametrize("seed", range(5))
def test_byte_tokenizer_split_characters_are_held_then_emitted(seed: int) -> None:
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list("aé€😀東 \n"), 60))
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a split character is never shown half
    assert sum(1 for p in pieces if p) < len(ids)  # multi-byte characters came in one piece


def test_trained_bpe_tokenizers_round_trip() -> None:
    toks, text = trained_tokenizers()
    for name, t in toks.items():
        tok = Wrapped(t)
        for line in text[:3]:
            ids = t.encode(line).ids
            assert "".join(stream(tok, ids)) == tok.decode(ids) == line, name
        rng = np.random.default_rng(1)  # random ids: characters split anywhere, odd neighbours
        for _ in range(20):
            ids = [int(i) for i in rng.integers(0, t.get_vocab_size(), 40)]
            assert "".join(stream(tok, ids)) == tok.decode(ids), (name, ids)


def test_word_level_fixture_tokenizer_keeps_its_spaces() -> None:
    path = HF_FIXTURES / "qwen2moe_gqa6x2_top2_shared40" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"HF fixtures not generated at {HF_FIXTURES}")
    tok = HFTokenizer(path)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, tok.vocab_size, 50)]
    full = tok.decode(ids)
    assert " " in full  # WordLevel joins tokens with spaces: decode is not concatenation
    assert "".join(stream(tok, ids)) == full


def test_each_token_decodes_a_bounded_window() -> None:
    text = "plain ascii text " * 200  # 3,400 tokens
    tok = Counting(ByteTokenizer())
    assert "".join(stream(tok, ByteTokenizer().encode(text))) == text
    assert max(tok.lengths) <= 2 and len(tok.lengths) <= 2 * len(text) + 3  # + the flush
    tok = Counting(ByteTokenizer())
    assert "".join(stream(tok, ByteTokenizer().encode("😀" * 500))) == "😀" * 500
    assert max(tok.lengths) <= 8  # 4-byte characters: 3 tokens held, then one piece


def test_invalid_bytes_are_emitted_once_the_window_is_full() -> None:
    d = IncrementalDetokenizer(ByteTokenizer(), max_window=3)
    got = [d.push(t) for t in (0x61, 0xF0, 0xF0, 0xF0, 0xF0)]  # "a", then lead bytes never completed
    # the window (context "a" + the held bytes) passes 3 tokens at the third lead byte
    assert got == ["a", "", "", "\ufffd" * 3, "\ufffd"]
    assert d.flush() == ""
    d = IncrementalDetokenizer(ByteTokenizer())
    assert [d.push(t) for t in (0x61, 0xF0)] == ["a", ""] and d.flush() == "\ufffd"  # a held tail
