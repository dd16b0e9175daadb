"""A short sample during training, by full recompute (no cache): slow but needs nothing but the model."""

import torch


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
    # A private generator: sampling must not move the global RNG, or a resumed run would diverge.
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    n_prompt = ids.shape[1]
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.cfg.max_seq_len:])
        logits = logits[0, -1].float() / temperature
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen).view(1, 1)], dim=1)
    return prompt + tokenizer.decode(ids[0, n_prompt:].tolist())
