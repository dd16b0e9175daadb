"""Supervised fine-tuning (+experiment=sft): the chat tokens grow a pretrained model (mean rows), the loss counts
the replies only (against a loss computed by hand), and an SFT run resumes exactly."""

import json
import random

import numpy as np
import pytest
import torch

import train
import training.trainer as trainer
from builders import tiny_model, train_tiny_tokenizer
from checkpoint import load_chat_template, load_checkpoint, load_model
from conftest import compose_config, tiny_overrides
from data import DataConfig, prepare
from data.chat import CHAT_TEMPLATE, IM_END, IM_START, add_chat_tokens, render_conversation
from data.conversations import Conversations
from test_train import assert_one_line_error, metrics, run_cli, train_losses
from test_trainer_failures import Crash, crash_after_save

pytestmark = pytest.mark.usefixtures("one_thread")


def sums(n: int, seed: int) -> list[dict]:
    """Short conversations (about 30 tokens with the tiny tokenizer): a system turn, a sum, its answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a} + {b}"},
                                 {"role": "assistant", "content": str(a + b)}]})
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "sums.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in sums(120, seed=0)))
    return path


def sft_args(corpus, data_cache, out, pretrained, chats) -> list[str]:
    """The tiny test run as fine-tuning: +experiment=sft from `pretrained` on `chats`, at the tiny run's sizes."""
    base = [a for a in tiny_overrides(corpus, data_cache, out) if not a.startswith(("data=", "data.path="))]
    return base + ["+experiment=sft", f"train.init_from={pretrained}", "data=chat", f"data.path={chats}",
                   "data.val_fraction=0.1", "train.seq_len=64", "train.max_steps=6", "train.eval_every=3",
                   "train.save_every=3", "train.warmup_steps=2", "train.sample_tokens=4"]


def test_sft_adds_the_chat_tokens_with_mean_rows(pretrained, chats, corpus, data_cache, tmp_path, capsys):
    out = tmp_path / "sft"
    train.run(compose_config(sft_args(corpus, data_cache, out, pretrained, chats) + [
        "train.lr=0", "train.max_steps=2", "train.batch_size=4"]))  # two evaluation batches of 4 conversations
    base, ft = load_checkpoint(pretrained), load_checkpoint(out)
    n = base.config["model"]["vocab_size"]
    assert ft.config["model"]["vocab_size"] == n + 2
    for name in ("embed.weight", "lm_head.weight"):  # lr 0: the weights are the ones fine-tuning started from
        old, new = base.model_state[name], ft.model_state[name]
        assert torch.equal(new[:n], old)
        assert torch.equal(new[n], old.mean(0)) and torch.equal(new[n + 1], old.mean(0))
    assert load_chat_template(out) == CHAT_TEMPLATE
    assert "init_from: new tokens <|im_end|>, <|im_start|>: their embedding and output rows start as the mean" in \
        capsys.readouterr().out
    # Step 1's loss is the started-from model's mean loss over the reply tokens of batch 0, computed here.
    model, _, _ = load_model(out, torch.device("cpu"), torch.float64)
    d = prepare(DataConfig(**ft.config["data"]))  # the run's data: the checkpoint's tokenizer + the chat tokens
    x, y = d.train_batches(64, 4, 1337).get_batch(0)
    assert train_losses(out)[1] == pytest.approx(reply_loss(model, [(x, y)]), abs=1e-5)
    # The validation loss: the mean over all the reply tokens of the evaluation batches (not over their rows).
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val[-1] == pytest.approx(reply_loss(model, list(d.val_batches(64, 4, 2))), abs=1e-5)


def reply_loss(model, batches) -> float:
    """The mean cross-entropy over the targets that are not -1 of all the batches, by hand."""
    picked = []
    for x, y in batches:
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0].double(), -1)
        picked.append(logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[y != -1])
    return -torch.cat(picked).mean().item()


def test_user_and_system_tokens_contribute_nothing():
    """The training loss of a batch of conversations equals the mean cross-entropy over the reply tokens alone,
    computed by hand in float64, and so does the gradient; the gradient reaching the hidden state of every other
    position is exactly zero."""
    tok = train_tiny_tokenizer()
    add_chat_tokens(tok)
    tok.encode_special_tokens = True
    rendered = [render_conversation(c["messages"], tok) for c in sums(6, seed=1)]
    split = Conversations(np.concatenate([ids for ids, _ in rendered]),
                          np.concatenate([m for _, m in rendered]).astype(np.uint8),
                          np.cumsum([0] + [len(ids) for ids, _ in rendered]), pad_id=0)
    x, y = split.rows(np.arange(6), seq_len=64)
    model = tiny_model(vocab_size=tok.get_vocab_size(with_added_tokens=True), weight_scale=1.0).train()
    hidden = {}

    def keep(module, inputs, out):  # the final hidden states, with their gradient
        out.retain_grad()
        hidden["h"] = out

    model.norm.register_forward_hook(keep)
    _, loss = model(x, y)
    loss.backward()
    reply = y != -1
    # Which positions are replies, independently of the mask: the targets there spell "<answer><|im_end|>".
    for r, (ids, _) in enumerate(rendered):
        answer = sums(6, seed=1)[r]["messages"][-1]["content"]
        assert tok.decode(y[r][reply[r]].tolist(), skip_special_tokens=False) == answer + IM_END
    assert torch.equal(hidden["h"].grad[~reply], torch.zeros_like(hidden["h"].grad[~reply]))
    assert (hidden["h"].grad[reply].abs().sum(-1) > 0).all()
    # By hand, in float64: the same loss and the same gradient on the output layer.
    h = hidden["h"].detach().double()
    w = model.lm_head.weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h[reply] @ w.t(), -1)
    by_hand = -logp.gather(-1, y[reply].unsqueeze(-1)).mean()
    by_hand.backward()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert torch.allclose(model.lm_head.weight.grad.double(), w.grad, atol=1e-6)


def test_sft_resumes_exactly(pretrained, chats, corpus, data_cache, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(compose_config(sft_args(corpus, data_cache, straight, pretrained, chats)))
    real_save = crash_after_save(monkeypatch, 3)
    with pytest.raises(Crash):
        train.run(compose_config(sft_args(corpus, data_cache, resumed, pretrained, chats)))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    train.run(compose_config(sft_args(corpus, data_cache, resumed, pretrained, chats) + ["train.resume=true"]))
    assert train_losses(resumed) == train_losses(straight)  # bitwise
    vals = lambda d: [(r["step"], r["val_loss"], r["val_bpb"]) for r in metrics(d) if "val_loss" in r]  # noqa: E731
    assert vals(resumed) == vals(straight) and len(vals(straight)) == 2
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
    samples = [r["sample"] for r in metrics(straight) if "sample" in r]
    assert samples and all(s.startswith(f"{IM_START}system\nAdd.") for s in samples)  # a chat prompt


def test_a_malformed_line_stops_the_run_in_one_line(pretrained, corpus, data_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(sums(1, 0)[0]) + "\n" + '{"messages": [{"role": "user", "content": "hi"}\n')
    proc = run_cli(*sft_args(corpus, data_cache, tmp_path / "sft", pretrained, bad))
    assert_one_line_error(proc, f"{bad}:2: not valid JSON")
