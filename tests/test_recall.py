"""data=recall (data/recall.py): the generator, its metric, the prepared data and the trainer's val_recall_acc.

The references here read the sequences with plain Python loops, independently of the vectorised code."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

import train
from conftest import compose_config
from data import DataConfig, DataError, TokenBatches, eval_batches, prepare
from data.recall import AnswerBatches, answer_targets, generate, recall_hits

PAIRS, VOCAB, SEQ_LEN = 8, 16, 64  # keys are ids 1..16, values 17..32, <|endoftext|> 0
SPEC = {"pairs": PAIRS, "vocab": VOCAB, "seq_len": SEQ_LEN, "first_key": 1, "eot_id": 0}


def is_key(t: int) -> bool:
    return 1 <= t <= VOCAB


def answers_in(window: list[int]) -> dict[int, int]:
    """{position t: the answer to the query at t} of a window of the stream: a key whose earlier occurrence in
    the same sequence (no <|endoftext|> between) is in the window; its answer is the token after that one."""
    out = {}
    for t, tok in enumerate(window):
        if not is_key(tok):
            continue
        for s in range(t - 1, -1, -1):
            if window[s] == 0:
                break
            if window[s] == tok:
                out[t] = window[s + 1]
                break
    return out


def test_every_answer_is_recoverable_from_its_context():
    seqs = generate(300, SEQ_LEN, PAIRS, VOCAB, seed=3)
    assert seqs.shape == (300, SEQ_LEN)
    for seq in seqs.tolist():
        assert seq[0] == 0 and 0 not in seq[1:]
        context = seq[1:1 + 2 * PAIRS]
        keys, values = context[0::2], context[1::2]
        assert all(map(is_key, keys)) and len(set(keys)) == PAIRS  # distinct keys
        assert all(VOCAB < v <= 2 * VOCAB for v in values)
        pairs = dict(zip(keys, values))
        rest = seq[1 + 2 * PAIRS:]
        queried = [(t, k) for t, k in enumerate(rest) if is_key(k)]
        assert sorted(k for _, k in queried) == sorted(keys)  # every key asked once
        for t, k in queried:
            assert t + 1 < len(rest) and rest[t + 1] == pairs[k]  # the value it was stored with follows


def test_same_seed_same_data():
    a, b = generate(50, SEQ_LEN, PAIRS, VOCAB, seed=7), generate(50, SEQ_LEN, PAIRS, VOCAB, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate(50, SEQ_LEN, PAIRS, VOCAB, seed=8))


def windows(n: int = 800, seq_len: int = 48, seed: int = 0) -> torch.Tensor:
    """Windows at random offsets of the stream, cutting sequences as the training windows do: [n, seq_len+1]."""
    stream = generate(200, SEQ_LEN, PAIRS, VOCAB, seed=1).reshape(-1)
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len - 1, size=n)
    return torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]))


def copying_logits(x: torch.Tensor, noise_seed: int = 0) -> torch.Tensor:
    """A model that knows the task: random logits, except a winning logit on the answer where there is one."""
    g = torch.Generator().manual_seed(noise_seed)
    logits = torch.rand(*x.shape, 1 + 2 * VOCAB, generator=g)
    for b, row in enumerate(x.tolist()):
        for t, answer in answers_in(row).items():
            logits[b, t, answer] = 2.0
    return logits


def test_a_model_that_copies_scores_one_and_a_guess_one_in_vocab():
    w = windows()
    x, y = w[:, :-1], w[:, 1:]
    expected = sum(len(answers_in(row)) for row in x.tolist())
    assert expected > 1500  # cut windows still hold many queries
    targets = answer_targets(x, y, SPEC)
    scored = int((targets != -1).sum())
    assert scored == expected and recall_hits(copying_logits(x), targets) == scored
    # Guessing among the values (uniform scores on them, nothing elsewhere): right 1 time in VOCAB.
    g = torch.Generator().manual_seed(1)
    guess = torch.full((*x.shape, 1 + 2 * VOCAB), -1e9)
    guess[..., VOCAB + 1:] = torch.rand(*x.shape, VOCAB, generator=g)
    right = int(recall_hits(guess, targets))
    assert right / scored == pytest.approx(1 / VOCAB, abs=0.02)  # over 3 standard errors at ~1,700 answers


def test_training_batches_keep_the_answers_alone():
    """AnswerBatches: every target is -1 (ignored by the loss) but at the answers, which are the values."""
    stream = generate(100, SEQ_LEN, PAIRS, VOCAB, seed=2).reshape(-1)
    batches = AnswerBatches(TokenBatches(stream, 48, 16, seed=0), SPEC | {"seq_len": 48})
    for step in range(3):
        x, y = batches.get_batch(step)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            answers = answers_in(row_x)
            assert row_y == [answers.get(t, -1) for t in range(len(row_x))]
    with pytest.raises(DataError, match="train.seq_len=48 is shorter than data.recall_seq_len=64"):
        AnswerBatches(TokenBatches(stream, 48, 16, seed=0), SPEC)


def test_prepare_recall_writes_sequences_and_a_word_level_tokenizer(tmp_path):
    cfg = DataConfig(source="recall", cache_dir=str(tmp_path), recall_pairs=PAIRS, recall_vocab=VOCAB,
                     recall_seq_len=SEQ_LEN, recall_sequences=100, val_fraction=0.1, seed=5)
    d = prepare(cfg)
    seqs = generate(100, SEQ_LEN, PAIRS, VOCAB, seed=5)
    assert np.array_equal(np.asarray(d.train).reshape(-1, SEQ_LEN), seqs[:90])
    assert np.array_equal(np.asarray(d.val).reshape(-1, SEQ_LEN), seqs[90:])  # held out: not in train
    assert d.vocab_size == 1 + 2 * VOCAB and d.meta["recall"] == SPEC
    tok = Tokenizer.from_file(str(d.tokenizer_path))  # what generate.py and the engine load
    assert tok.encode("<|endoftext|> k0 v15 k15 v0").ids == [0, 1, 32, 16, 17]
    assert tok.encode("\n").ids == [0]  # the trainer's sample prompt: a sequence start
    assert tok.decode(seqs[0, :3].tolist()) == f"k{seqs[0, 1] - 1} v{seqs[0, 2] - 1 - VOCAB}"
    assert d.meta["n_val_bytes"] == len(tok.decode(seqs[90:].reshape(-1).tolist()).encode())


@pytest.mark.parametrize("change, message", [
    ({"recall_vocab": 4}, "recall_vocab=4 is below data.recall_pairs=8"),
    ({"recall_seq_len": 32}, "recall_seq_len=32 cannot hold 8 pairs"),
    ({"tokenizer_path": "tok.json"}, "unset data.tokenizer_path"),
])
def test_bad_recall_options_name_the_fix(change, message):
    cfg = DataConfig(**{"source": "recall", "recall_pairs": PAIRS, "recall_vocab": VOCAB, "recall_seq_len": SEQ_LEN,
                        **change})
    with pytest.raises(DataError, match=message):
        cfg.validate()


def test_trainer_logs_recall_accuracy_of_the_held_out_answers(data_cache, tmp_path):
    """A short run on data=recall: each evaluation logs val_recall_acc and val_loss, which must be the share of
    the val windows' answers the checkpoint's model predicts and its mean loss on them, counted here by the
    loops above."""
    from checkpoint import load_model
    from engine import LLM, SamplingParams
    from model import Transformer

    out = tmp_path / "run"
    cfg = compose_config([
        "data=recall", f"data.recall_pairs={PAIRS}", f"data.recall_vocab={VOCAB}", "data.recall_sequences=400",
        f"data.cache_dir={data_cache}", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64",
        "model.max_seq_len=64", f"train.seq_len={SEQ_LEN}", "train.batch_size=8", "train.max_steps=4",
        "train.eval_every=2", "train.eval_batches=2", "train.sample_tokens=4", "train.warmup_steps=1",
        "train.log_every=1", "train.progress=false", "wandb.mode=disabled", f"out_dir={out}"])
    train.run(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["val_recall_acc"] <= 1 for r in evals)
    model, _, _ = load_model(out, torch.device("cpu"), torch.float32)
    data = prepare(OmegaConf.to_object(cfg.data))  # the run's data, from the cache
    # The first step's loss: the initial weights (the trainer seeds them with cfg.seed) on step 0's windows,
    # every target but the answers ignored.
    torch.manual_seed(cfg.seed)
    initial = Transformer(model.cfg)
    x, y = TokenBatches(data.train, SEQ_LEN, 8, seed=cfg.seed).get_batch(0)
    targets = torch.full_like(y, -1)
    for b, row in enumerate(x.tolist()):
        for t, answer in answers_in(row).items():
            targets[b, t] = answer
    with torch.no_grad():
        assert records[0]["train_loss"] == pytest.approx(initial(x, targets)[1].item(), rel=1e-4)
    right = scored = windows = nats = 0
    with torch.no_grad():
        for x, y in eval_batches(data.val, SEQ_LEN, 8, 2):
            windows += len(x)
            logp = torch.log_softmax(model(x)[0].double(), -1)
            for b, row in enumerate(x.tolist()):
                for t, answer in answers_in(row).items():
                    assert y[b, t] == answer
                    scored, right = scored + 1, right + int(logp[b, t].argmax() == answer)
                    nats -= logp[b, t, answer].item()
    assert scored == windows * PAIRS  # evaluation windows are whole sequences: every query counts
    assert evals[-1]["val_recall_acc"] == pytest.approx(right / scored)
    assert evals[-1]["val_loss"] == pytest.approx(nats / scored, rel=1e-5)  # the loss is on the answers alone
    # The checkpoint's word-level tokenizer serves generation like any other.
    llm = LLM(out, device="cpu")
    (done,) = llm.generate(["<|endoftext|> k1 v3 k1"], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    assert done.prompt_token_ids == [0, 2, 20, 2] and len(done.token_ids) == 3
    assert all(w[0] in "kv" and w[1:].isdigit() for w in done.text.split())
