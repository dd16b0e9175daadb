"""SamplingParams: how one request is decoded. Plain data, validated when built."""

from dataclasses import dataclass, field
from typing import Optional

MAX_LOGPROBS = 20  # alternatives reported per token, at most (OpenAI's limit)


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    temperature         0 means greedy (argmax); > 0 divides the logits before sampling.
    top_k               keep the k most likely tokens (0 = off).
    top_p               keep the smallest set of most likely tokens whose mass reaches top_p; the token
                        that crosses the threshold is kept (1.0 = off).
    min_p               keep tokens whose probability is at least min_p times the top token's (0 = off).
    repetition_penalty  CTRL/HF-style: a logit of a token already in the prompt or the output is divided
                        by the penalty if positive, multiplied if negative (1.0 = off).
    max_new_tokens      at most this many generated tokens (generation also stops at the model's context).
    stop                strings that end generation; the text is cut before the first one found.
    ignore_eos          keep going after the end-of-text token (benchmarks).
    stop_token_ids      token ids that end generation like the end-of-text token (ignore_eos aside), kept as
                        the last output token: a chat reply ends at <|im_end|> (vLLM's name and meaning).
    seed                seeds this request's own generator, so its samples do not depend on which other
                        requests share the batch. None: drawn from torch's global RNG at submission.
    n                   number of independent samples (they share the prompt's KV blocks).
    return_logits       keep the raw model logits of every generated position (tests, debugging).
    logprobs            report the log-probability of each sampled token and of the `logprobs` most
                        likely tokens at its position (0 = the sampled token only; None = off), under
                        the model's distribution: log-softmax of the logits before penalty, temperature
                        and filters (what vLLM reports by default).
    prompt_logprobs     report, for every prompt token after the first, its log-probability given the
                        tokens before it and the `prompt_logprobs` most likely tokens at its position
                        (vLLM's name and meaning; 0 = the token only; None = off), from the same
                        distribution as logprobs. Such a request computes its prompt from the first
                        position it scores: it takes no prefix-cache hit there (its blocks are still
                        cached for others).
    prompt_logprobs_start
                        with prompt_logprobs: report prompt tokens from this index on (the entries before
                        are None), so the blocks before it may come from the prefix cache: eval.py scores
                        the continuations of one context computing the context once.

    The filters apply in this order: repetition penalty, temperature, top-k, top-p, min-p.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None
    n: int = 1
    return_logits: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    prompt_logprobs_start: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        need(self.top_k >= 0 or self.top_k == -1, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.n >= 1, f"the number of samples must be >= 1, got {self.n}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids),
             f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                 f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        need(isinstance(self.prompt_logprobs_start, int) and self.prompt_logprobs_start >= 1,
             f"prompt_logprobs_start must be an integer >= 1, got {self.prompt_logprobs_start!r}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
