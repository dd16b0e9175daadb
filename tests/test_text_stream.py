"""engine/text.py's TextStream against an independent reference: the tokenizer's decode of the whole
output so far, on text whose characters are split across byte-level tokens (the tiny tokenizer has
few merges: accented letters, CJK and emojis are 2-4 byte tokens each), and on random token ids (what a
random model writes: bytes that never make a character)."""

import random

import pytest

from builders import train_tiny_tokenizer
from engine.text import TextStream, find_stop

TRICKY = "naïve café — 日本語 ½ 😀👍🏽 e\u0301 🇫🇷 To be, or not to be, that is the question. "


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer()


def test_split_characters_come_out_whole_as_the_full_decode_has_them(tok):
    ids = tok.encode(TRICKY * 3).ids
    assert sum("\ufffd" in tok.decode([t]) for t in ids) > 20  # many tokens are part of a character
    ts, out, text = TextStream(tok.decode, []), [], ""
    for t in ids:
        out.append(t)
        text += ts.push(out)
        # everything but the character still split at the end (shown as U+FFFD by the decoder)
        assert text == tok.decode(out).rstrip("\ufffd")
    assert text + ts.finish(tok.decode(out)) == TRICKY * 3


@pytest.mark.parametrize("seed", range(5))
def test_random_tokens_stream_what_the_full_decode_says(tok, seed):
    rng = random.Random(seed)
    vocab = tok.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(400)]
    ts, out, text = TextStream(tok.decode, []), [], ""
    for t in ids:
        out.append(t)
        text += ts.push(out)
        assert tok.decode(out).startswith(text)
    whole = tok.decode(out)
    assert text + ts.finish(whole) == whole


@pytest.mark.parametrize("stop", ["to be", "日本", "😀👍", "question. na"])
def test_nothing_past_a_stop_string_is_streamed(tok, stop):
    ids = tok.encode(TRICKY * 2).ids
    ts, out, text = TextStream(tok.decode, [stop, "never there"]), [], ""
    for t in ids:
        out.append(t)
        text += ts.push(out)
        assert stop not in text and tok.decode(out).startswith(text)
    final = tok.decode(out)[:find_stop(tok.decode(out), [stop])]  # the engine's final text: cut at the stop
    assert text + ts.finish(final) == final == (TRICKY * 2)[:(TRICKY * 2).index(stop)]


def test_each_token_decodes_a_window_that_does_not_grow_with_the_output(tok):
    """The cost per token is the decoding of a few tokens, at token 4,000 as at token 10 (re-decoding
    the whole output at every token made streaming quadratic). A character is at most 4 bytes, each
    byte at most one token: a window holds at most two characters' tokens."""
    ids = tok.encode(TRICKY * 200).ids
    assert len(ids) > 4000
    decoded = []

    def decode(window):
        decoded.append(len(window))
        return tok.decode(window)

    ts, out = TextStream(decode, ["question."]), []
    for t in ids[:4000]:
        out.append(t)
        decoded.clear()
        ts.push(out)
        assert sum(decoded) <= 2 * 2 * 4, (len(out), decoded)


def test_a_decoder_that_needs_the_previous_token():
    """SentencePiece-style tokenizers (Metaspace, as in Llama's Hugging Face folders) drop the space of
    a decode's first word: each window starts at the token before the new ones, for its context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator([TRICKY] * 20, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    ids = sp.encode("To be, or not to be, that is the question.").ids
    assert sp.decode(ids[1:2]) != " " + sp.decode(ids[1:2]).lstrip()  # alone, a word loses its space
    ts, out, text = TextStream(sp.decode, []), [], ""
    for t in ids:
        out.append(t)
        text += ts.push(out)
        assert text == sp.decode(out)
