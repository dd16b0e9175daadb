"""Small builders for the tests: a tiny random model and a complete checkpoint folder."""

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import save_checkpoint
from data.chat import CHAT_TEMPLATE, TEMPLATE_FILE, add_chat_tokens
from data.tokenizer import train_tokenizer
from model import ModelConfig, Transformer


def tiny_config(attention: str = "gqa", **overrides) -> ModelConfig:
    """dim 64, 2 layers, 4 query heads (MHA: 4 kv heads, GQA: 2, MQA: 1; MLA: latent 32 + rope 8)."""
    kv = {"mha": 4, "gqa": 2, "mqa": 1, "mla": 4}[attention]
    kw = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, ffn_dim=128, max_seq_len=256,
              attention=attention, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_model(attention: str = "gqa", seed: int = 0, weight_scale: float = 2.0, **overrides) -> Transformer:
    """A seeded random model in fp32. weight_scale > 1 sharpens the logits, so greedy decoding has clear
    winners (top-2 margins far above float32 noise) and the generated text is not constant."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(attention, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(weight_scale)
    return model


def train_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on a few sentences (the data pipeline's own set-up), EOT at id 0."""
    text = ["To be, or not to be, that is the question.", "Once upon a time there was a small model.",
            "The quick brown fox jumps over the lazy dog.", "ROMEO: But soft, what light through yonder window breaks?"]
    return train_tokenizer(text * 20, vocab_size)


def write_checkpoint(root: Path, attention: str = "gqa", seed: int = 0, step: int = 1, chat: bool = False,
                     **overrides) -> Path:
    """A run folder `root` with checkpoints/latest holding a tiny random model and its tokenizer; chat: the
    tokenizer has the chat tokens, and the chat template is saved beside it (as data=chat does)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer()
    tok_path = root / "tokenizer.json"
    if chat:
        add_chat_tokens(tok)
        (root / TEMPLATE_FILE).write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    tok.save(str(tok_path))
    vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    model = tiny_model(attention, seed=seed, vocab_size=vocab, **overrides)
    config = {"model": asdict(model.cfg), "data": {}, "train": {}}
    save_checkpoint(root / "checkpoints", step, model.state_dict(), {"step": step}, config, tok_path,
                    tied_embeddings=model.cfg.tie_embeddings)
    return root


def dequantized_copy(model, skip=()):
    """The fp32 model with every nn.Linear weight (but those in skip) replaced by round(w / s) * s,
    s = max|w| / 127 per row, computed here in float64."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear) and name not in skip:
                w = m.weight.double()
                s = w.abs().amax(1, keepdim=True) / 127
                m.weight = nn.Parameter((torch.round(w / s) * s).float())  # unties a tied head, as int8 does
    return ref


def end_reply_early(run: Path, messages: list[dict], at: int = 2) -> None:
    """Make the chat checkpoint of `run` end its greedy reply to `messages` with <|im_end|> after `at` tokens:
    the output row of <|im_end|> becomes 1.5 x the row of the token the reply has there, whose logit is the
    largest there (with these random weights also positive: the tests check the reply they expect)."""
    from safetensors.torch import load_file, save_file

    from checkpoint import load_chat_template
    from data.chat import end_of_turn_id, prompt_ids
    from engine import LLM, SamplingParams

    llm = LLM(run, device="cpu")
    ids = prompt_ids(messages, load_chat_template(run), llm.tokenizer)
    free = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=at + 1, ignore_eos=True))[0].token_ids
    weights = (Path(run) / "checkpoints" / "latest" / "model.safetensors").resolve()
    state = load_file(weights)
    state["lm_head.weight"][end_of_turn_id(llm.tokenizer)] = 1.5 * state["lm_head.weight"][free[at]]
    save_file(state, weights, metadata={"step": "1"})


def chat_reply(llm, run: Path, messages: list[dict], max_new_tokens: int) -> tuple[str, list[int]]:
    """(text, token ids) of the API's greedy reply to `messages` with the chat template of `run`, ended by
    <|im_end|>: what generate.py --chat and serve.py must answer."""
    from checkpoint import load_chat_template
    from data.chat import end_of_turn_id, prompt_ids
    from engine import SamplingParams

    ids = prompt_ids(messages, load_chat_template(run), llm.tokenizer)
    end = end_of_turn_id(llm.tokenizer)
    out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_token_ids=[end]))[0]
    return out.text, out.token_ids
