"""Incremental detokenization with the real SmolLM2 tokenizer: UTF-8 safe, equal to a full decode."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from engine.stopping import StopStringMatcher

TEXTS = [
    "北京是中国的首都，上海是最大的城市。",
    "Emoji time: 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵!",
    "Crème brûlée, naïve façade, São Paulo, Øresund, Dvořák.",
    "  leading spaces,\ttabs\nand new lines  ",
    "mixed: 東京 🗼 café — “quotes” ½",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_decode_without_broken_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    # Multi-byte characters span several tokens here, so some steps must hold text back.
    if any(ord(c) > 0x2000 for c in text):
        assert "" in pieces[:-1]


def test_each_step_decodes_a_short_window_not_the_whole_output(tokenizer):
    ids = tokenizer("word " * 400, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    widest = 0
    for i in ids:
        detokenizer.add(i)
        widest = max(widest, len(detokenizer.token_ids) - detokenizer.prefix_offset)
    assert widest <= 4


def test_special_tokens_are_not_text(tokenizer):
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.add(i) for i in ids) + detokenizer.flush() == "Hi"


@pytest.mark.parametrize(
    "pieces, stop, sent, stopped",
    [
        (["Hello", " wor", "ld. Bye"], ["world"], "Hello ", True),
        (["The end", "ing is near"], ["END"], "The ending is near", False),
        (["a<", "/s", "> b"], ["</s>"], "a", True),
        (["a<", "b"], ["</s>"], "a<b", False),  # held back while it could start a stop string, then released
        (["x", "y"], ["yz", "q"], "xy", False),
    ],
)
def test_stop_strings_hold_back_possible_starts_and_never_send_the_stop_text(pieces, stop, sent, stopped):
    matcher = StopStringMatcher(stop)
    out, hit = "", False
    for piece in pieces:
        released, hit = matcher.push(piece)
        out += released
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (sent, stopped)


def test_text_that_may_start_a_stop_string_is_held_until_resolved():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("O") == ("", False)
    assert matcher.push("RY") == ("STORY", False)


def reference_stop_matching(pieces: list[str], stop: list[str]) -> tuple[str, bool]:
    """What stop strings mean, computed the slow way: the text up to the earliest stop string found once a piece
    has arrived, and everything when none is."""
    text = ""
    for piece in pieces:
        text += piece
        starts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        if starts:
            return text[: min(starts)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet="abc\n", max_size=6), max_size=12),
    stop=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=5), min_size=1, max_size=4),
)
def test_stop_matching_equals_searching_the_whole_text_after_every_piece(pieces, stop):
    matcher = StopStringMatcher(stop)
    sent, hit = "", False
    for piece in pieces:
        released, hit = matcher.push(piece)
        sent += released
        # Held back: only a text that could still become a stop string.
        assert any(s.startswith(matcher.pending) for s in stop) or not matcher.pending
        if hit:
            break
    if not hit:
        sent += matcher.flush()
    assert (sent, hit) == reference_stop_matching(pieces, stop)


@pytest.mark.parametrize("text", [t for t in TEXTS if any(ord(c) > 0x2000 for c in t)])
def test_an_output_cut_inside_a_character_ends_without_a_broken_one(tokenizer, text):
    """max_tokens can end the output between the bytes of one character: its last text is the complete
    characters, with no U+FFFD (seen on a Chinese answer cut at 48 tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT_CHAR)]
    assert cuts, "this text has no token boundary inside a character"
    for n in cuts:
        detokenizer = IncrementalDetokenizer(tokenizer)
        sent = "".join(detokenizer.add(i) for i in ids[:n]) + detokenizer.flush()
        assert REPLACEMENT_CHAR not in sent
        assert sent == tokenizer.decode(ids[:n]).rstrip(REPLACEMENT_CHAR) and text.startswith(sent)
