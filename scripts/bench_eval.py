"""Benchmark eval.py's scoring: loglikelihood requests per second, our EngineLM (the paged engine, the
choices of a question sharing its context through the prefix cache) against lm-evaluation-harness's
`hf` model (transformers) on the same Hugging Face export and the same requests, in one run (the machine
is shared: figures taken at different times differ).

    python scripts/bench_eval.py --ckpt runs/a                                  # a 4-choice task written here
    python scripts/bench_eval.py --ckpt runs/a --tasks hellaswag --limit 200     # harness tasks (the hub's data)
    python scripts/bench_eval.py --ckpt exports/a-hf --batch_size 16 --json

--ckpt: a run or checkpoint folder (exported to a temporary Hugging Face folder here, as export.py does)
or a Hugging Face folder. The default task: --limit questions of 40-80 words, each with 4 endings of
5-15 words (hellaswag's shape), as lm-eval YAML over a JSON file in a temporary folder. The harness
builds the requests once; both models score all of them with the same batch size and window
(max_length = max_seq_len - 2, EngineLM's) and the same torch threads (OMP_NUM_THREADS; our thread
governor is off), each after a warm-up batch. Printed: requests/s of each, the speed-up, the share of
prompt tokens our engine took from the prefix cache, and the largest difference between the two
log-likelihoods of a request.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the king queen lord lady sword crown night day love death speak hear thou art my good sweet fair "
         "noble heart eyes blood time life world hand heaven").split()


def write_task(folder: Path, n: int, seed: int = 0) -> str:
    """A multiple-choice task of n questions in `folder`; returns its name."""
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    docs = [{"ctx": say(40, 80), "endings": [say(5, 15) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]
    (folder / "bench_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'bench_mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{ctx}}\"\ndoc_to_choice: endings\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return "bench_mc"


def loglikelihood_requests(names: list[str], include_path, limit) -> list:
    """The harness's loglikelihood requests of the tasks (zero-shot), built as simple_evaluate builds them."""
    from evaluation.harness import load_tasks

    requests = []
    for obj in load_tasks(names, include_path)[1]:
        for task in obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj]:  # a group's tasks
            task.set_config(key="num_fewshot", value=0)
            task.build_all_requests(limit=limit)
            requests += [i for i in task.instances if i.request_type == "loglikelihood"]
    return requests


def timed(make_lm, requests: list, batch: int) -> tuple[float, list, object]:
    """Seconds to score all requests, the scores, and the model; a warm-up batch first, on another model
    of the same make (first-call costs stay out of the figure, and so do prefix-cache hits it left)."""
    make_lm().loglikelihood(requests[:batch], disable_tqdm=True)
    lm = make_lm()
    t0 = time.perf_counter()
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - t0, scores, lm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run, checkpoint or Hugging Face folder")
    p.add_argument("--tasks", default=None, help="comma-separated harness tasks (default: a task written here)")
    p.add_argument("--include_path", default=None, help="a folder of task YAML files")
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per batch, both models")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from checkpoint.hf import is_hf_folder
    from engine import LLM
    from evaluation.harness import EngineLM
    from export import main as export_main

    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(args.ckpt)
        if not is_hf_folder(hf):
            hf = Path(tmp) / "hf"
            if export_main(["--ckpt", args.ckpt, "--format", "hf", "--out", str(hf)]) != 0:
                return 2
        names = args.tasks.split(",") if args.tasks else [write_task(Path(tmp), args.limit)]
        requests = loglikelihood_requests(names, args.include_path or (None if args.tasks else tmp), args.limit)
        # Both on the same threads: our thread governor (engine/threads.py) would set them for HF's run too.
        t_ours, s_ours, ours = timed(lambda: EngineLM(LLM(args.ckpt, device="cpu", dtype=torch.float32,
                                                         max_num_seqs=args.batch_size, adaptive_threads=False)),
                                     requests, args.batch_size)
        t_hf, s_hf, _ = timed(lambda: HFLM(pretrained=str(hf), batch_size=args.batch_size, max_length=ours.max_length,
                                           dtype="float32", device="cpu"), requests, args.batch_size)
    stats = ours.llm.core.stats
    result = {"requests": len(requests), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "ours_requests_per_s": round(len(requests) / t_ours, 2), "hf_requests_per_s": round(len(requests) / t_hf, 2),
              "speedup": round(t_hf / t_ours, 2), "prefix_hit_rate": round(stats.prefix_hit_rate, 4),
              "max_abs_diff": max(abs(a - b) for (a, _), (b, _) in zip(s_ours, s_hf))}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} loglikelihood requests, batch {args.batch_size}, {result['threads']} threads: "
              f"ours {result['ours_requests_per_s']} req/s (prefix hits {result['prefix_hit_rate']:.0%} of prompt "
              f"tokens), lm_eval hf {result['hf_requests_per_s']} req/s, {result['speedup']}x; largest "
              f"|difference| {result['max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
