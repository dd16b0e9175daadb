"""Streaming text cost per token at token 100 and at about token 4,000 of one generation.

    python scripts/bench_text_stream.py [--ckpt runs/a] [--repeats 1000]

engine/text.py's TextStream decodes only the new tokens (in a window from the previous one), so a
token costs the same however long the output already is; decoding the whole output at every token
(what it did before) costs more the longer the output. Both are timed at each position on the same
tokens: the median of --repeats pushes of that one token, each from the same state. The tokens are a
text with accented letters, CJK and emojis, repeated, in the checkpoint's tokenizer (default: a
byte-level BPE trained here on a few sentences, whose characters split across tokens); the later
position is the same token as token 100 in the same context, a whole number of repeats on.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.text import TextStream, find_stop  # noqa: E402

TEXT = "naïve café — 日本語 ½ 😀👍🏽 To be, or not to be, that is the question. ROMEO: But soft! "
STOPS = ["\nUser:"]


def tokenizer(ckpt):
    if ckpt is not None:
        from checkpoint.load import load_pretrained
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(load_pretrained(ckpt).tokenizer_path))
    from data.tokenizer import train_tokenizer

    return train_tokenizer([TEXT] * 20, 300)


class WholeDecode:
    """The previous method: the whole output decoded (and searched for a stop string) at every token."""

    def __init__(self, decode, stops):
        self.decode, self.stops = decode, stops

    def push(self, out):
        text = self.decode(out)
        return "" if text.endswith("\ufffd") else text[:find_stop(text, self.stops)]


def per_token_us(make, ids, at: int, repeats: int) -> float:
    """Median microseconds of the push of token `at`, each time from a copy of the state after ids[:at]."""
    stream, out = make(), []
    for t in ids[:at]:
        out.append(t)
        stream.push(out)
    out.append(ids[at])
    times = []
    for _ in range(repeats):
        s = copy.copy(stream)
        t0 = time.perf_counter_ns()
        s.push(out)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="a run or checkpoint folder whose tokenizer to use")
    ap.add_argument("--repeats", type=int, default=1000)
    args = ap.parse_args(argv)
    tok = tokenizer(args.ckpt)
    ids = tok.encode(TEXT * 400).ids
    assert len(ids) > 4000, len(ids)
    # The text repeats every `period` tokens: the two positions are the same token in the same context.
    period = len(tok.encode(TEXT * 3).ids) - len(tok.encode(TEXT * 2).ids)
    early, late = 100, 100 + (3900 // period) * period
    print(f"{'':26} {f'token {early}':>12} {f'token {late}':>12} {'ratio':>7}")
    for name, kind in (("incremental (TextStream)", TextStream), ("whole output every token", WholeDecode)):
        a, b = (per_token_us(lambda: kind(tok.decode, STOPS), ids, at, args.repeats) for at in (early, late))
        print(f"{name:26} {a:9.1f} us {b:9.1f} us {b / a:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
