"""Export to GGUF: llama.cpp (through llama-cpp-python, built from source) loads the file and computes what we do.

The reference is llama.cpp itself: f32 greedy continuations equal to our engine's for 32 tokens,
text tokenized by llama.cpp's own tokenizer equal to our ids, f16 and q8_0 files that load and stay
close to our logits.
"""

import numpy as np
import pytest
import torch

from builders import write_checkpoint
from checkpoint.gguf import load_in_llama_cpp
from engine import LLM, SamplingParams
from export import main as export_main

# attention and ModelConfig overrides; MLA keeps its latent eps equal to norm_eps (llama.cpp has one eps).
VARIANTS = {"mha": ("mha", {}), "gqa": ("gqa", {}), "mqa": ("mqa", {}), "mla": ("mla", {}),
            "mla_qlora": ("mla", {"q_lora_rank": 24}),
            "gqa_tied_llama3": ("gqa", {"tie_embeddings": True, "rope_theta": 500000.0, "rope_scaling_factor": 8.0,
                                        "rope_original_max_seq_len": 64})}
MIXED = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n\n"
         "  naïve café — 東京 🚀 \t tabs\tand   runs of    spaces\r\n<|endoftext|>ROMEO: end")
PROMPTS = ("ROMEO: But soft", "To be, or not", "The quick brown fox jumps over the lazy dog. Once upon a time")


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory):
    attention, overrides = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return write_checkpoint(root / "run", attention, seed=5, **overrides)


def export_gguf(run, outtype: str):
    out = run.parent / f"model-{outtype}.gguf"
    if not out.exists():
        assert export_main(["--ckpt", str(run), "--format", "gguf", "--out", str(out), "--outtype", outtype]) == 0
    return out


def llama_cpp_greedy(llama, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens by argmax over llama.cpp's logits, and the logits of the prompt's positions."""
    llama.reset()
    llama.eval(prompt)
    prompt_logits = np.array(llama.scores[: len(prompt)])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
        llama.eval([out[-1]])
    return out, prompt_logits


def test_f32_greedy_and_logits_equal_ours(run):
    llm = LLM(run, device="cpu", dtype=torch.float32)
    llama = load_in_llama_cpp(export_gguf(run, "f32"), n_ctx=128, logits_all=True, f32_kv=True)
    assert llama.n_vocab() == llm.cfg.vocab_size
    prompts = [llm.tokenizer.encode(p).ids for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        theirs, logits = llama_cpp_greedy(llama, prompt, 32)
        assert theirs == out.token_ids
        assert llm.cfg.tie_embeddings or len(set(theirs)) > 3  # tied random models tend to echo a token
        with torch.no_grad():
            ours = llm.model(torch.tensor([prompt]))[0][0].numpy()
        assert np.abs(ours - logits).max() < 1e-5  # f32 weights and (here) an f32 KV cache


def test_tokenization_equals_ours(run):
    llm = LLM(run, device="cpu", dtype=torch.float32)
    llama = load_in_llama_cpp(export_gguf(run, "f32"), n_ctx=64)
    ids = llm.tokenizer.encode(MIXED).ids
    assert llama.tokenize(MIXED.encode(), add_bos=False, special=True) == ids
    assert llama.detokenize(ids, special=True).decode() == MIXED


@pytest.mark.parametrize("outtype, tol", [("f16", 0.005), ("q8_0", 0.05)])
def test_f16_and_q8_0_load_and_generate(run, outtype, tol):
    f32, smaller = export_gguf(run, "f32"), export_gguf(run, outtype)
    assert smaller.stat().st_size < 0.6 * f32.stat().st_size
    llm = LLM(run, device="cpu", dtype=torch.float32)
    llama = load_in_llama_cpp(smaller, n_ctx=128, logits_all=True)
    prompt = llm.tokenizer.encode(PROMPTS[2]).ids
    tokens, logits = llama_cpp_greedy(llama, prompt, 32)
    assert len(tokens) == 32 and all(0 <= t < llm.cfg.vocab_size for t in tokens)
    with torch.no_grad():
        ours = llm.model(torch.tensor([prompt]))[0][0].numpy()
    # Rounding the weights moves the logits a little, not to something else.
    assert np.abs(ours - logits).max() < tol * np.abs(ours).max()


def test_mla_with_another_latent_eps_is_refused(tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run", "mla", latent_norm_eps=1e-6)  # norm_eps stays 1e-5
    assert export_main(["--ckpt", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: llama.cpp normalises MLA latents") and err.count("\n") == 1
    assert not (tmp_path / "m.gguf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_tokenizer_with_many_merges_equals_ours(tmp_path):
    """A tokenizer rich enough that the pre-tokenizer matters (numbers, punctuation runs, contractions,
    whitespace): llama.cpp must split text with GPT-2's regex, as ours does, to give the same ids."""
    from builders import tiny_model
    from checkpoint.gguf import write_gguf
    from data.tokenizer import train_tokenizer, vocab_size_of

    texts = ["Shall I compare thee to a summer's day? Thou art more lovely, and more temperate!!",
             "In 1609, 154 sonnets... cost 12345 pence; 3.14159 -- 'tis true: #1, (quoth he) [sic] {x} <tag> "
             "a+b=c ^_^ ~ok | 100%",
             "naïve café — 東京 🚀 \t tabs\tand   runs of    spaces\r\n\n\n  indented\n",
             "don't won't I'll we've they're she'd it's DON'T SHOUTING?! ... --- ___"]
    tok = train_tokenizer(texts * 30, 700)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model("gqa", vocab_size=vocab_size_of(tok))
    write_gguf(tmp_path / "m.gguf", model.cfg, model.state_dict(), tmp_path / "tokenizer.json", 0)
    llama = load_in_llama_cpp(tmp_path / "m.gguf", n_ctx=64)
    for text in texts + [" ".join(texts), MIXED]:
        assert llama.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids
