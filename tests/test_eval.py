"""eval.py: lm-evaluation-harness on our paged engine, against the harness's own models as references.

The references are independent of our engine: `lm_eval --model hf` (transformers) on the Hugging Face
export, and `lm_eval --model local-completions` against serve.py (the harness's HTTP client and its own
parsing of echoed log-probabilities). Per request, the log-likelihoods agree within 1e-4 and the
greedy flags, accuracies and generated texts are identical. The hub is unreachable here: the tasks are
lm-eval YAML files over local JSON files (tasks_for): a multiple-choice task, a perplexity task
(loglikelihood_rolling, documents longer than the window) and a generation task with a stop string that
cuts some of the greedy outputs. The models are tiny random checkpoints with a 64-token context
(tests/builders.py), exported with export.py; the harness reads max_length = 64 - 2 tokens, as ours.
"""

import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from builders import write_checkpoint
from conftest import ROOT, compose_config, tiny_overrides
from eval import main as eval_main
from export import main as export_main

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 64  # the models' max_seq_len; the harness's hf model reads CONTEXT - 2 tokens, as EngineLM does
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]
MAX_GEN = 12
WORDS = "the king queen lord lady sword crown night day love death speak hear thou art my good sweet".split()


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def greedy_ids(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    from engine import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n))]


def write_tasks(folder: Path, llm=None, seed: int = 0) -> dict:
    """The three tasks as YAML over JSON files in `folder`. With `llm`, the data is made to exercise the
    scoring: some questions get the model's 2-token greedy continuation as their answer (greedy flags
    true, accuracy above chance), and the stop string is a character the greedy outputs contain (so
    some are cut). Returns {"stop": the stop string, "uncut": {prompt: greedy text without a stop}}."""
    rng, tok = random.Random(seed), llm.tokenizer if llm is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"question": words(rng, 3, 30), "choices": [words(rng, 1, 4) for _ in range(4)], "answer": rng.randrange(4)}
          for _ in range(8)]
    # A context loses its left end to leave (context + 2 tokens) the window of CONTEXT - 1 tokens.
    contexts = [tok.encode(f"Q: {d['question']}\nA:").ids[-(CONTEXT - 3):] for d in mc] if llm else []
    for doc, ids in zip(mc, greedy_ids(llm, contexts, 2) if llm else []):
        text, context = tok.decode(ids), f"Q: {doc['question']}\nA:"
        if tok.encode(context + text).ids == tok.encode(context).ids + ids:  # the harness will score these ids
            doc["choices"][doc["answer"]] = text
    ppl = [{"text": words(rng, 5, 40)} for _ in range(6)]
    gen = [{"prompt": words(rng, 2, 8), "target": "x"} for _ in range(6)]
    info = {"stop": "e", "uncut": {}}
    if llm is not None:
        texts = [tok.decode(ids) for ids in greedy_ids(llm, [tok.encode(d["prompt"]).ids for d in gen], MAX_GEN)]
        info["uncut"] = dict(zip((d["prompt"] for d in gen), texts))
        inner = [c for t in texts for c in t[1:] if c.isprintable() and c != "\ufffd"]
        info["stop"] = max(set(inner), key=inner.count)  # the most common character after the first
    files = {"tiny_mc": (mc, "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
                                 "target_delimiter: \"\"\ndoc_to_choice: choices\ndoc_to_target: answer\n",
                         ["acc", "acc_norm"]),
             "tiny_ppl": (ppl, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n",
                          ["word_perplexity", "byte_perplexity", "bits_per_byte"]),
             "tiny_gen": (gen, "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
                               f"generation_kwargs:\n  until: {json.dumps([info['stop']])}\n  do_sample: false\n"
                               f"  max_gen_toks: {MAX_GEN}\n", ["exact_match"])}
    # What the tasks share, in a YAML file that is no task (the harness's include; eval.py must not refuse it)
    (folder / "_defaults.yaml").write_text("dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n")
    for name, (docs, spec, metrics) in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(
            f"include: _defaults.yaml\ntask: {name}\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            f"{spec}metric_list:\n" + "".join(f"  - metric: {m}\n" for m in metrics))
    return info


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """attention -> (our run folder, its Hugging Face export, the task folder written for it, task info)."""
    from engine import LLM

    made = {}

    def get(attention: str):
        if attention not in made:
            root = tmp_path_factory.mktemp(attention)
            extra = {"latent_norm_eps": 1e-6} if attention == "mla" else {}  # exportable MLA (checkpoint/hf.py)
            run = write_checkpoint(root / "run", attention, seed=3, max_seq_len=CONTEXT, **extra)
            assert export_main(["--ckpt", str(run), "--format", "hf", "--out", str(root / "hf")]) == 0
            info = write_tasks(root / "tasks", LLM(run, device="cpu"))
            made[attention] = run, root / "hf", root / "tasks", info
        return made[attention]
    return get


def ours(run: Path, tasks: Path, out: Path) -> dict:
    """eval.py's results with every request's scores (--log_samples), read back from --output_path."""
    assert eval_main(["--ckpt", str(run), "--tasks", ",".join(TASKS), "--include_path", str(tasks),
                      "--batch_size", "4", "--output_path", str(out), "--log_samples"]) == 0
    return json.loads(out.read_text())


def reference(model: str, model_args: dict, tasks: Path) -> dict:
    """The harness's own model on the same tasks (in-process: what `lm_eval --model <model>` runs)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


def flat(resp: list) -> list:
    """One response of a sample as a list: [text], [log-likelihood] or [log-likelihood, greedy]."""
    value = resp[0]
    return [v.item() if hasattr(v, "item") else v for v in (value if isinstance(value, (list, tuple)) else [value])]


def assert_agree(got: dict, want: dict, info: dict) -> None:
    for task in TASKS:
        a = sorted(got["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(want["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and a
        for x, y in zip(a, b):
            for ra, rb in zip(map(flat, x["resps"]), map(flat, y["resps"]), strict=True):
                if task == "tiny_gen":
                    assert ra == rb, (x["doc"], ra, rb)
                else:  # (log-likelihood, greedy) per choice; one log-likelihood per document
                    assert abs(ra[0] - rb[0]) < 1e-4 and ra[1:] == rb[1:], (task, x["doc_id"], ra, rb)
        for metric, value in want["results"][task].items():
            if isinstance(value, (int, float)) and "perplexity" not in metric:
                assert got["results"][task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, metric)
    # The data did what it was made for: greedy answers scored, some generations cut by the stop string.
    assert any(flat(c)[1] for s in got["samples"]["tiny_mc"] for c in s["resps"])
    assert got["results"]["tiny_mc"]["acc,none"] > 0
    cut = [s for s in got["samples"]["tiny_gen"] if info["stop"] in info["uncut"][s["doc"]["prompt"]]]
    assert cut, "no greedy output holds the stop string"
    for s in cut:  # the text ends before the first stop string
        uncut = info["uncut"][s["doc"]["prompt"]]
        assert s["resps"][0][0] == uncut[:uncut.index(info["stop"])]


def hf_args(hf: Path) -> dict:
    return {"pretrained": str(hf), "max_length": CONTEXT - 2, "dtype": "float32", "device": "cpu"}


@pytest.mark.parametrize("attention", ["gqa", "mla"])  # MLA: the export is DeepseekV3ForCausalLM
def test_agrees_with_lm_eval_hf_on_the_export(models, attention, tmp_path):
    run, hf, tasks, info = models(attention)
    assert_agree(ours(run, tasks, tmp_path / "ours.json"), reference("hf", hf_args(hf), tasks), info)


class Served:
    """serve.py on a free port of 127.0.0.1, started and stopped through its command line only."""

    def __init__(self, run: Path):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(run), "--port", "0",
                                      "--served-model-name", "tiny"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        log = []
        for line in self.proc.stderr:  # uvicorn names its address once it listens
            log.append(line)
            if "Uvicorn running on" in line:
                self.url = line.split("running on ")[1].split()[0]
                threading.Thread(target=lambda: log.extend(self.proc.stderr), daemon=True).start()  # drain
                return
        raise RuntimeError("serve.py did not start:\n" + "".join(log))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=300)


@pytest.mark.slow  # ~60 s for both: a server process and the harness's HTTP client, one request at a time
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_agrees_with_lm_eval_local_completions_against_serve(models, attention, tmp_path):
    run, hf, tasks, info = models(attention)
    server = Served(run)
    try:
        # max_length: the client keeps one token for the one it asks serve.py to generate, so 64 gives the
        # windows and truncation of our 62 (and contexts of up to 64 - 1 - max_gen_toks for generation).
        args = {"base_url": server.url + "/v1/completions", "model": "tiny", "tokenizer_backend": "huggingface",
                "tokenizer": str(hf), "max_length": CONTEXT, "max_retries": 1}
        want = reference("local-completions", args, tasks)
    finally:
        server.stop()
    assert_agree(ours(run, tasks, tmp_path / "ours.json"), want, info)


def test_shared_contexts_take_the_prefix_cache_and_score_the_same(models):
    """The choices of one context: scored after one of them computed the context, they take its blocks
    from the prefix cache, and score what an engine without a prefix cache scores."""
    from lm_eval.api.instance import Instance

    from engine import LLM
    from evaluation.harness import EngineLM

    run = models("gqa")[0]
    context = " ".join(WORDS[:10]) + ":"  # 43 tokens: 2 whole blocks of 16 before the choices
    requests = [Instance("loglikelihood", {}, (context, choice), i) for i, choice in enumerate([" a", " the", " x y"])]
    cached = LLM(run, device="cpu", max_num_seqs=4)
    got = EngineLM(cached).loglikelihood(requests, disable_tqdm=True)
    assert cached.core.stats.prefix_hit_tokens == 2 * 32  # the two other choices found those 2 blocks
    want = EngineLM(LLM(run, device="cpu", enable_prefix_caching=False)).loglikelihood(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(got, want, strict=True):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b


def test_task_metrics_leave_what_training_owns_alone(models):
    """train.eval_tasks runs between training steps: the model's mode, torch's threads and the global
    random generators are as they were (the harness seeds random, numpy and torch by default)."""
    import numpy as np

    from checkpoint import load_model
    from evaluation.harness import load_tasks, task_metrics

    run, _, tasks, _ = models("gqa")
    model, tok, _ = load_model(run, torch.device("cpu"), torch.float32)
    model.train()
    states = lambda: (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: E731
    manager, loaded = load_tasks([str(tasks / "tiny_mc.yaml")])  # as the trainer does, before its first step
    before, threads = states(), torch.get_num_threads()
    got = task_metrics(model, tok, manager, loaded, 4, torch.device("cpu"))
    assert set(got) == {"tiny_mc/acc", "tiny_mc/acc_norm"}
    after = states()
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
    assert model.training and torch.get_num_threads() == threads


# ---- bits per byte of a text file ---------------------------------------------------------------------

def test_text_bits_per_byte_match_a_float64_reference(tmp_path, capsys):
    """Consecutive windows of --seq_len tokens, each target scored once, nats over the UTF-8 bytes of the
    scored tokens: recomputed here with a float64 copy of the model and a plain log-softmax. The printed
    line is the one README.md's evaluation section shows."""
    from checkpoint import load_model

    run = write_checkpoint(tmp_path / "run", "gqa", seed=1)
    text = tmp_path / "play.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me! — naïve café\n" * 3)
    model, tok, _ = load_model(run, torch.device("cpu"), torch.float32)
    model = model.double()
    ids, T = tok.encode(text.read_text()).ids, 16
    n = (len(ids) - 1) // T * T  # every whole window
    assert n // T >= 3  # a batch of all windows but one: the last batch is a partial one, scored too
    assert eval_main(["--ckpt", str(run), "--text", str(text), "--seq_len", str(T), "--batch_size", str(n // T - 1),
                      "--output_path", str(tmp_path / "bpb.json")]) == 0
    got = json.loads((tmp_path / "bpb.json").read_text())
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([ids[i:i + T]]))[0][0] for i in range(0, n, T)])
    nats = -logits.log_softmax(-1)[torch.arange(n), torch.tensor(ids[1:n + 1])].sum().item()
    n_bytes = len(tok.decode(ids[1:n + 1]).encode("utf-8"))
    assert (got["tokens"], got["bytes"], got["seq_len"]) == (n, n_bytes, T)
    assert got["bits_per_byte"] == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-6)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"{text}: {got['bits_per_byte']:.4f} bits per byte ({nats / n:.4f} nats per token over {n:,} "
                    f"tokens, {n_bytes:,} bytes, in windows of {T} tokens)")


# ---- bad input: one line `error: ...`, exit code 2, nothing written ------------------------------------

def assert_one_line_error(argv: list[str], capsys, pattern: str, out: Path) -> None:
    capsys.readouterr()
    assert eval_main(argv + ["--output_path", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err
    assert not out.exists()


@pytest.mark.slow  # ~25 s: to know a name is no task, the harness indexes its 14k built-in task files
def test_unknown_task_is_one_line_error(models, tmp_path, capsys):
    run, _, tasks, _ = models("gqa")
    assert_one_line_error(["--ckpt", str(run), "--tasks", "tiny_mcc", "--include_path", str(tasks)], capsys,
                          "unknown task 'tiny_mcc' (did you mean tiny_mc?)", tmp_path / "results.json")


def test_bad_input_is_one_line_error(models, tmp_path, capsys, monkeypatch):
    run, _, tasks, _ = models("gqa")
    out = tmp_path / "results.json"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiny_bad.yaml").write_text("task: tiny_bad\ndoc_to_text: [unclosed\n")
    assert_one_line_error(["--ckpt", str(run), "--tasks", "tiny_bad", "--include_path", str(broken)], capsys,
                          f"task file {broken / 'tiny_bad.yaml'} does not parse", out)
    (tmp_path / "not_a_run").mkdir()
    assert_one_line_error(["--ckpt", str(tmp_path / "not_a_run"), "--tasks", "tiny_mc", "--include_path", str(tasks)],
                          capsys, "no checkpoint at", out)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    assert_one_line_error(["--ckpt", str(run), "--tasks", "tiny_mc"], capsys,
                          "eval.py needs lm-evaluation-harness: pip install -r requirements-eval.txt", out)


# ---- during training ------------------------------------------------------------------------------------

def wandb_summary(run_folder: Path) -> dict:
    """The summary records of an offline wandb run folder (tests/test_train.py reads the file)."""
    from wandb.proto import wandb_internal_pb2

    from test_train import read_wandb_records

    summary = {}
    for data in read_wandb_records(next(run_folder.glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
    return summary


@pytest.mark.slow  # ~25 s: a tiny training run with wandb offline, then eval.py --wandb
def test_train_eval_tasks_are_logged_at_each_evaluation(corpus, data_cache, tmp_path, monkeypatch):
    """train.eval_tasks=[task files]: each evaluation logs <task>/<metric>; the last one (the final weights)
    equals eval.py on the final checkpoint, which --wandb adds to the run's own (offline) wandb run."""
    tasks = tmp_path / "tasks"
    write_tasks(tasks)
    out = tmp_path / "run"
    import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    names = [str(tasks / f"{t}.yaml") for t in TASKS]
    train.run(compose_config(tiny_overrides(corpus, data_cache, out) + ["wandb.mode=offline"] +
                             ["train.eval_tasks=[" + ",".join(f"'{n}'" for n in names) + "]"]))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [r["step"] for r in evals] == [3, 6]
    keys = {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_ppl/bits_per_byte", "tiny_gen/exact_match"}
    assert all(keys <= set(r) for r in evals)
    assert evals[0]["tiny_ppl/bits_per_byte"] != evals[1]["tiny_ppl/bits_per_byte"]  # scored on the new weights
    trained = set((out / "wandb").glob("offline-run-*"))
    assert eval_main(["--ckpt", str(out), "--tasks", ",".join(TASKS), "--include_path", str(tasks),
                      "--output_path", str(tmp_path / "final.json"), "--wandb"]) == 0
    got = json.loads((tmp_path / "final.json").read_text())["results"]
    [logged] = set((out / "wandb").glob("offline-run-*")) - trained
    assert logged.name.endswith("-" + (out / "wandb_run_id").read_text().strip())  # the training run's id
    summary = wandb_summary(logged)
    for key in keys:
        task, metric = key.split("/")
        assert evals[1][key] == pytest.approx(got[task][f"{metric},none"], rel=1e-6)
        assert summary[key] == pytest.approx(got[task][f"{metric},none"], rel=1e-6)
