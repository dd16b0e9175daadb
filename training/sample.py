"""A short sample during training, by full recompute (no KV cache): slow, but it needs nothing but the
model. Tokens are drawn by the engine's sampler, so training and generation sample the same way."""

import torch

from engine.sampler import Sampler, make_generator
from engine.sampling_params import SamplingParams


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, device: torch.device, seed: int = 0) -> str:
    # A private generator: sampling must not move the global RNG, or a resumed run would diverge.
    params = [SamplingParams(temperature=0.8, top_k=50, seed=seed)]
    generators = [make_generator(seed)]
    sampler = Sampler()
    ids = tokenizer.encode(prompt).ids
    n_prompt = len(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.cfg.max_seq_len:]], device=device)
        logits, _ = model(context)
        tokens, _ = sampler(logits[:, -1].float(), params, generators, [ids])
        ids += tokens
    return prompt + tokenizer.decode(ids[n_prompt:])
