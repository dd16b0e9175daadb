"""train.init_from: fine-tuning starts from a checkpoint's weights, model config and tokenizer, with a
fresh optimizer and step, and resumes exactly like any run."""

import math
import re

import pytest
import torch

import train
from checkpoint import load_checkpoint
from conftest import compose_config, tiny_overrides
from test_train import assert_one_line_error, run_cli, train_losses
from test_trainer_failures import Crash, crash_after_save
import training.trainer as trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_pretrained(tmp_path_factory):
    """A Llama 3-layout folder written by transformers itself (untied GQA, theta 500000, llama3 scaling)."""
    from test_import_hf import save_random

    folder = tmp_path_factory.mktemp("hf_llama")
    save_random(folder, "llama")
    return folder


def test_init_from_takes_weights_config_and_tokenizer(pretrained, corpus, data_cache, tmp_path):
    out = tmp_path / "ft"
    # Another model size and vocabulary asked for: the checkpoint's model and tokenizer win.
    args = tiny_overrides(corpus, data_cache, out) + [f"train.init_from={pretrained}", "model.n_layers=3",
                                                      "data.vocab_size=400", "train.lr=0", "train.max_steps=2"]
    summary = train.run(compose_config(args))
    assert summary["final_step"] == 2  # a fresh step count
    src, ft = load_checkpoint(pretrained), load_checkpoint(out)
    assert ft.config["model"] == src.config["model"]
    assert ft.config["data"]["tokenizer_path"] == str(src.tokenizer_path)
    assert ft.tokenizer_path.read_bytes() == src.tokenizer_path.read_bytes()
    for k in src.model_state:  # lr 0: the weights are exactly the ones loaded
        assert torch.equal(ft.model_state[k], src.model_state[k]), k
    state = ft.trainer_state()
    # A fresh optimizer: AdamW's step counts (embeddings, norms, head) are 2; Muon (the matrices) keeps none.
    opt_state = state["optimizer"]["state"].values()
    assert state["step"] == 2 and all(s["step"] == 2 for s in opt_state if "step" in s)
    assert any("step" in s for s in opt_state) and any("momentum_buffer" in s for s in opt_state)


@pytest.mark.parametrize("source", ["ours", "hf"])
def test_fine_tune_resumes_exactly(source, request, corpus, data_cache, tmp_path, monkeypatch):
    """From one of our runs, or from a Hugging Face folder (README: fine-tuning a model on a new corpus)."""
    pretrained = request.getfixturevalue("pretrained" if source == "ours" else "hf_pretrained")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = [f"train.init_from={pretrained}", "train.lr=1e-3", "train.warmup_steps=1"]
    cfg = compose_config(tiny_overrides(corpus, data_cache, straight) + base)
    train.run(cfg)
    # Step 1's loss is the loaded model's loss on the first batch (computed here without the trainer).
    from checkpoint import load_model
    from data import TokenBatches
    from data.pipeline import prepare
    from training.plan import make_plan

    model, _, _ = load_model(pretrained, torch.device("cpu"), torch.float32)
    d = prepare(make_plan(cfg).data)  # the run's data: tokenized with the checkpoint's tokenizer
    x, y = TokenBatches(d.train, cfg.train.seq_len, cfg.train.batch_size, cfg.seed).get_batch(0)
    with torch.no_grad():
        assert train_losses(straight)[1] == pytest.approx(model(x, y)[1].item(), abs=1e-5)

    real_save = crash_after_save(monkeypatch, 3)
    with pytest.raises(Crash):
        train.run(compose_config(tiny_overrides(corpus, data_cache, resumed) + base))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    train.run(compose_config(tiny_overrides(corpus, data_cache, resumed) + base + ["train.resume=true"]))
    assert train_losses(resumed) == train_losses(straight)


@pytest.mark.slow  # two start-ups of train.py, about 18 s: make test is at its 10-minute budget
def test_init_from_refuses_a_contradicting_model_option(pretrained, corpus, data_cache, tmp_path):
    args = tiny_overrides(corpus, data_cache, tmp_path / "ft")
    # The tiny overrides repeat the checkpoint's own sizes: accepted. Another depth is not.
    assert_one_line_error(run_cli(*args, f"train.init_from={pretrained}", "model.n_layers=3"),
                          "model.n_layers=3 contradicts train.init_from")
    assert_one_line_error(run_cli(*args, f"train.init_from={tmp_path / 'nothing'}"), "no checkpoint at")


def test_init_from_and_the_budget_are_printed(pretrained, corpus, data_cache, tmp_path, capsys):
    """What the weights came from (path, step, parameters, tokenizer), and how many passes over the training
    tokens the budget makes: checked against the checkpoint's files and the prepared data."""
    from omegaconf import OmegaConf
    from safetensors import safe_open

    from data.pipeline import cache_folder, load_prepared

    cfg = compose_config(tiny_overrides(corpus, data_cache, tmp_path / "ft") + [
        f"train.init_from={pretrained}", "train.max_steps=2", "train.batch_size=64", "train.eval_every=2"])
    capsys.readouterr()
    train.run(cfg)
    printed = capsys.readouterr().out
    src = (pretrained / "checkpoints" / "latest").resolve()
    with safe_open(src / "model.safetensors", "pt") as f:  # the stored tensors (a tied head is stored once)
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    step = load_checkpoint(pretrained).trainer_state()["step"]
    assert f"init_from: {src} (step {step}): {n_params / 1e6:.2f}M parameters, tokenizer {src / 'tokenizer.json'}" \
        in printed
    n_train = len(load_prepared(cache_folder(OmegaConf.to_object(cfg.data))).train)
    m = re.search(r"budget: 2 steps x 2,048 tokens = ([\d.]+) passes over ([\d,]+) training tokens", printed)
    assert m, printed
    assert int(m[2].replace(",", "")) == n_train and float(m[1]) == pytest.approx(2 * 2048 / n_train, abs=0.05)
