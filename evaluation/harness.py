"""lm-evaluation-harness on the paged engine: the harness's model interface over our LLM, and task runs.

    from engine import LLM
    from evaluation.harness import EngineLM, load_tasks, run_tasks
    manager, tasks = load_tasks(["my_task"], include_path="tasks/")
    results = run_tasks(EngineLM(LLM("runs/a")), manager, tasks)     # the harness's results dict

EngineLM subclasses the harness's TemplateLM, which turns (context, continuation) strings into token ids
as its `hf` model does (the trailing spaces of a context move to the continuation; an empty context
becomes the end-of-text token), so the two score the same tokens. The scoring is ours, on the engine:
  loglikelihood          one engine request per (context, continuation): the prompt is both, and the
                         engine reports the log-probabilities of the continuation's tokens
                         (SamplingParams.prompt_logprobs from prompt_logprobs_start). One request per
                         context runs first (context_waves), so the others find the context in the
                         prefix cache and compute only their continuation (the choices of a
                         multiple-choice question).
  loglikelihood_rolling  the harness's disjoint windows over a document (cut as for its hf model),
                         scored as above and summed.
  generate_until         every request at once (continuous batching), greedy unless the task samples,
                         the text cut before the first stop string.
The window: a prompt leaves the engine room for the one token it generates, and its last token is only
scored, so the model reads at most max_seq_len - 2 tokens (`max_length`, the harness's name); longer
inputs lose their left end, as in the harness.
"""

import difflib
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from engine import LLM, SamplingParams
from engine.sampler import request_seed

from . import EvalError

# generation_kwargs of a task that map onto SamplingParams (besides until, max_gen_toks and do_sample)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Every request has its own seed (request i of a call: request_seed(SEED, i), as generate.py seeds), so
# a sampling task's results do not depend on torch's global generator, which is left alone (training's).
SEED = 1234  # the harness's default seed


class EngineLM(TemplateLM):
    """The harness's model interface on an LLM (see the module docstring); its batch is llm.config.max_num_seqs."""

    def __init__(self, llm: LLM, max_gen_toks: int = 256):
        super().__init__()
        self.llm = llm
        self.max_length = llm.cfg.max_seq_len - 2
        self.max_gen_toks = max_gen_toks  # for tasks that do not set one (the harness's hf model's default)

    @property
    def eot_token_id(self) -> int:
        return self.llm.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string).ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (log-probability of the continuation, whether each
        of its tokens is the most likely one), in order."""
        prompts, starts = [], []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise EvalError(f"a continuation of {len(continuation)} tokens does not fit the model's window "
                                f"of {self.max_length} tokens")
            ids = (context + continuation)[-(self.max_length + 1):]
            prompts.append(ids)
            starts.append(len(ids) - len(continuation))
        results = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            # Half the KV cache keeps the contexts of a wave for the next one, which runs in the other half.
            for wave in context_waves(prompts, starts, self.llm.config.block_size, self.llm.num_blocks // 2):
                params = [SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=1,
                                         prompt_logprobs_start=starts[i], seed=0) for i in wave]
                for i, out in zip(wave, self.llm.generate([prompts[i] for i in wave], params)):
                    scored = list(zip(prompts[i][starts[i]:], out.prompt_logprobs[starts[i]:]))
                    results[i] = (sum(lp.logprob for _, lp in scored), all(lp.top[0][0] == tok for tok, lp in scored))
                bar.update(len(wave))
        for (key, _, _), result in zip(requests, results):
            if key is not None:  # None: a window of loglikelihood_rolling, cached per document there
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each document, summed over the harness's disjoint windows."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request through the engine at once; each text ends before its first stop string."""
        eos = self.llm.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params = [], []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            p = self.sampling_params(gen_kwargs, eos, request_seed(SEED, i))
            # The left end goes to leave room for the new tokens, as in the harness's hf model.
            prompts.append(self.tok_encode(context)[-(self.max_length - p.max_new_tokens):] or [self.prefix_token_id])
            params.append(p)
        outs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        for r, out in zip(requests, outs):
            self.cache_hook.add_partial("generate_until", r.args, out.text)
        return [out.text for out in outs]

    def sampling_params(self, gen_kwargs: dict, eos: str, seed: int) -> SamplingParams:
        """A task's generation_kwargs as SamplingParams (the harness's own normalisation: do_sample false
        means temperature 0, max_gen_toks and its aliases, the end-of-text string added to the stops)."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        stop = [s for s in handle_stop_sequences(kw.pop("until", None), eos) if s]
        max_new = kw.pop("max_gen_toks")
        kw.pop("do_sample", None)
        if max_new >= self.max_length:
            raise EvalError(f"a task generates up to {max_new} tokens but the model reads at most {self.max_length}: "
                            "set generation_kwargs.max_gen_toks lower in its YAML")
        unknown = sorted(set(kw) - set(SAMPLING_KEYS))
        if unknown:
            raise EvalError(f"generation_kwargs {unknown} are not supported (eval.py takes until, max_gen_toks, "
                            f"do_sample and {', '.join(SAMPLING_KEYS)})")
        try:
            return SamplingParams(max_new_tokens=max_new, stop=stop, seed=seed, **kw)
        except ValueError as e:
            raise EvalError(f"generation_kwargs: {e}") from None


def context_waves(prompts: list[list[int]], starts: list[int], block_size: int, max_blocks: int) -> list[list[int]]:
    """The requests (indices) in waves for the engine: for distinct contexts (prompt[:start]) whose blocks
    fill at most max_blocks, one request per context, then the others sharing them. A context's blocks
    enter the prefix cache once the forward that computed them has run, so the second wave finds them
    there (requests of one wave may share a step, and each would compute the context) while it has the
    rest of the cache for its own blocks."""
    by_context = defaultdict(list)
    for i, (prompt, start) in enumerate(zip(prompts, starts)):
        by_context[tuple(prompt[:start])].append(i)
    chunks, used = [[]], 0
    for group in by_context.values():
        need = -(-starts[group[0]] // block_size)
        if chunks[-1] and used + need > max_blocks:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += need
    waves = [wave for chunk in chunks for wave in ([g[0] for g in chunk], [i for g in chunk for i in g[1:]])]
    return [wave for wave in waves if wave]


def check_task_files(include_path: str) -> None:
    """EvalError naming the first YAML file under include_path that does not parse (the harness would
    skip it quietly, and its task would then be unknown)."""
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise EvalError(f"--include_path {include_path} is not a folder (of task YAML files)")
    for path in sorted(folder.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False)  # the harness's own reader (its !function tags, includes)
        except Exception as e:  # the YAML parser's or the harness's own complaint
            reason = " ".join(str(e).split())[:200]
            raise EvalError(f"task file {path} does not parse ({type(e).__name__}: {reason})") from None


def load_tasks(names: list[str], include_path: Optional[str] = None) -> tuple[TaskManager, list]:
    """The harness's TaskManager and the tasks (and groups) `names` asks for: task, group or tag names, or
    YAML files. EvalError for a task file that does not parse, an unknown name, or data that cannot be
    loaded (tasks load their data here: the hub's datasets need a connection)."""
    if include_path is not None:
        check_task_files(include_path)
    # The harness's own 14k task files take 10-25 s to index: only when include_path lacks a task asked for.
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if not all(name in manager.all_tasks or Path(name).is_file() for name in names):
        manager = TaskManager(include_path=include_path)
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            raise EvalError(f"unknown task '{name}'" + (f" (did you mean {close[0]}?)" if close else "") +
                            ": `lm_eval ls tasks` lists the harness's tasks; --include_path DIR adds a folder of "
                            "task YAML files")
    try:
        loaded = manager.load(names)
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise EvalError(f"cannot load the tasks {', '.join(names)} ({type(e).__name__}: {reason})") from None
    children = {c for kids in loaded["group_map"].values() for c in kids}
    top = [g for n, g in loaded["groups"].items() if n not in children]
    return manager, top + [t for n, t in loaded["tasks"].items() if n not in children]


def run_tasks(lm: EngineLM, manager: TaskManager, tasks: list, limit: Optional[float] = None, **options) -> dict:
    """The harness's evaluation of `tasks` (from load_tasks) with `lm`: its results dict. options: the
    harness's simple_evaluate's (log_samples, bootstrap_iters, the seeds it sets, ...)."""
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, batch_size=lm.llm.config.max_num_seqs,
                           **options)


def flat_metrics(results: dict) -> dict:
    """{"task/metric": value} of a results dict's metrics ("metric,filter" keys; "acc,none" becomes "acc";
    stderrs left out)."""
    return {f"{task}/{key.removesuffix(',none')}": value
            for task, metrics in results["results"].items() for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def task_metrics(model: torch.nn.Module, tokenizer, manager: TaskManager, tasks: list, limit: Optional[float],
                 device: torch.device) -> dict:
    """train.eval_tasks: `tasks` scored with the weights of `model` as they are now (fp32, on `device`).
    What the run owns is left as it was: its mode (the LLM puts the model in eval mode), torch's thread
    count (adaptive threads off), the global random generators (the harness would seed them, and it draws
    ids from Python's; no stderr is bootstrapped either)."""
    training, python_rng = model.training, random.getstate()
    try:
        llm = LLM(model=model, tokenizer=tokenizer, device=device, dtype=torch.float32, adaptive_threads=False)
        return flat_metrics(run_tasks(EngineLM(llm), manager, tasks, limit, log_samples=False, bootstrap_iters=0,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None))
    finally:
        model.train(training)
        random.setstate(python_rng)
