"""A chat skill a small model learns in minutes on a CPU, checked exactly: adding two numbers below 100.

    system:    You add numbers.
    user:      What is 38 plus 47?
    assistant: 85
    user:      Add 6 and 90.
    assistant: 96

One to three questions per conversation, in four wordings, with or without a system turn. The test set is scored
on each conversation's last question, and asks only sums that no training conversation asks: a right answer
is addition learned from the examples, not a line of the training data recalled.

    python -m scripts.chat_skill data --out chat_skill/            # train.jsonl and test.jsonl, seeded
    python -m scripts.chat_skill measure --out runs/chat_skill     # the table of docs/chat.md (about 10 minutes)

`measure` pretrains a base model on the plays (train.py model=tiny), fine-tunes it on the conversations
(+experiment=sft), then answers the held-out test conversations greedily with the base model (plain "User:" /
"Assistant:" turns, its first line), the base model with the chat tokens added but not fine-tuned, and the
fine-tuned model; it prints the table, and with --write-docs puts it into docs/chat.md.
"""

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?")
SYSTEMS = (None, "You add numbers.", "Answer with the sum.")
MAX_TERM, MAX_TURNS = 99, 3


def conversation(rng: random.Random) -> dict:
    """One to MAX_TURNS questions, each a sum of two numbers from 0 to MAX_TERM, each answered with the sum."""
    system = rng.choice(SYSTEMS)
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(rng.randint(1, MAX_TURNS)):
        a, b = rng.randint(0, MAX_TERM), rng.randint(0, MAX_TERM)
        messages += [{"role": "user", "content": rng.choice(QUESTIONS).format(a=a, b=b)},
                     {"role": "assistant", "content": str(a + b)}]
    return {"messages": messages}


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(n)]


def sums_asked(c: dict) -> list[tuple[int, int]]:
    """The (a, b) of each question of a conversation, in order."""
    return [tuple(map(int, re.findall(r"\d+", m["content"]))) for m in c["messages"] if m["role"] == "user"]


def held_out(n: int, seed: int, train: list[dict]) -> list[dict]:
    """n conversations whose last question, the one scored, asks a sum no training conversation asks (in
    that order): a right answer is addition, not a memorised line of the training data."""
    seen = {s for c in train for s in sums_asked(c)}
    rng, out = random.Random(seed), []
    while len(out) < n:
        c = conversation(rng)
        if sums_asked(c)[-1] not in seen:
            out.append(c)
    return out


def write_data(out: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    train = conversations(n_train, seed)
    test = held_out(n_test, seed + 1, train)
    for name, convs in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    return out / "train.jsonl", out / "test.jsonl"


# ----------------------------------------------------------------------------- measure

def train(*args: str) -> float:
    """Run train.py with `args`; the seconds it took."""
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "wandb.mode=disabled", "train.progress=false",
           "train.overwrite=true"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def score(llm, template, tests: list[dict], stop: list[str], stop_ids: list[int]) -> tuple[float, float]:
    """(exact-match share, share of replies ending with one of stop_ids) of greedy replies to the test prompts."""
    from data.chat import prompt_ids
    from engine import SamplingParams

    prompts = [prompt_ids(c["messages"][:-1], template, llm.tokenizer) for c in tests]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, stop=stop, stop_token_ids=stop_ids))
    right = sum(o.text.strip() == c["messages"][-1]["content"] for o, c in zip(outs, tests))
    ended = sum(bool(o.token_ids) and o.token_ids[-1] in stop_ids for o in outs)
    return right / len(tests), ended / len(tests)


def with_chat_tokens(base: Path):
    """The base model with the chat tokens added as fine-tuning starts (rows = mean rows), not fine-tuned."""
    import torch

    from checkpoint import load_pretrained
    from data.chat import add_chat_tokens
    from data.tokenizer import load_tokenizer
    from engine import LLM
    from model import Transformer
    from training.resume import add_new_tokens

    p = load_pretrained(base)
    tok = load_tokenizer(str(p.tokenizer_path))
    add_chat_tokens(tok)
    p, _ = add_new_tokens(p, tok)
    model = Transformer(p.config)
    model.load_state_dict(p.state_dict)
    return LLM(model=model, tokenizer=tok, eos_token_id=p.eos_id, device="cpu", dtype=torch.float32)


def evaluate(base: Path, sft: Path, tests: list[dict]) -> list[tuple[str, str, float, float]]:
    from checkpoint import load_chat_template
    from data.chat import CHAT_TEMPLATE, end_of_turn_id
    from engine import LLM

    base_llm = LLM(base, device="cpu")
    rows = [("base model", "plain `User:`/`Assistant:` turns, first line", *score(base_llm, None, tests, ["\n"], []))]
    grown = with_chat_tokens(base)
    rows.append(("base model + chat tokens, not fine-tuned", "ChatML",
                 *score(grown, CHAT_TEMPLATE, tests, [], [end_of_turn_id(grown.tokenizer)])))
    sft_llm = LLM(sft, device="cpu")
    rows.append(("fine-tuned (+experiment=sft)", "ChatML (the checkpoint's template)",
                 *score(sft_llm, load_chat_template(sft), tests, [], [end_of_turn_id(sft_llm.tokenizer)])))
    return rows


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def measure(args) -> str:
    load0, t0 = Path("/proc/loadavg").read_text().split()[:3], time.time()
    out = Path(args.out).resolve()
    train_file, test_file = write_data(out / "data", args.train, args.test, args.seed)
    base_s = train("model=tiny", f"train.max_steps={args.base_steps}", f"train.eval_every={args.base_steps}",
                   f"train.save_every={args.base_steps}", f"out_dir={out / 'base'}")
    # Rows are one conversation each, padded to train.seq_len; these are under 80 tokens, so 96 rather than
    # the preset's 256 (a third of the compute for the same conversations).
    sft_s = train("+experiment=sft", f"train.init_from={out / 'base'}", "data=chat", f"data.path={train_file}",
                  f"train.max_steps={args.sft_steps}", "train.seq_len=96", f"out_dir={out / 'sft'}")
    tests = [json.loads(line) for line in test_file.read_text().splitlines()]
    t_eval = time.time()
    rows = evaluate(out / "base", out / "sft", tests)
    eval_s, load1 = time.time() - t_eval, Path("/proc/loadavg").read_text().split()[:3]
    lines = ["| model | prompt | exact match | replies ending with `<|im_end|>` |", "|---|---|---|---|"]
    lines += [f"| {name} | {prompt} | {acc:.1%} | {ended:.1%}{' (it has no such token)' if i == 0 else ''} |"
              for i, (name, prompt, acc, ended) in enumerate(rows)]
    command = f"python -m scripts.chat_skill measure --out {args.out} --base-steps {args.base_steps} " \
              f"--sft-steps {args.sft_steps} --write-docs"
    lines += ["", f"{len(tests)} held-out conversations, greedy, at most 16 new tokens. Base: {args.base_steps} "
              f"steps of `python train.py model=tiny` on the plays ({base_s / 60:.1f} min); fine-tuning: "
              f"{args.sft_steps} steps of `+experiment=sft train.seq_len=96` on {args.train} conversations "
              f"({sft_s / 60:.1f} min); "
              f"scoring {eval_s:.0f} s. Measured {date.today()} on {machine()}, load average {' '.join(load0)} at "
              f"the start and {' '.join(load1)} at the end, {(time.time() - t0) / 60:.1f} min in all, by "
              f"`{command}`."]
    return "\n".join(lines)


BEGIN, END = "<!-- chat_skill: begin -->", "<!-- chat_skill: end -->"


def write_docs(table: str) -> None:
    doc = ROOT / "docs" / "chat.md"
    text = doc.read_text()
    head, rest = text.split(BEGIN)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END)[1]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["data", "measure"])
    ap.add_argument("--out", required=True, help="data: the folder of train.jsonl/test.jsonl; measure: the work folder")
    ap.add_argument("--train", type=int, default=20000, help="training conversations")
    ap.add_argument("--test", type=int, default=200, help="held-out conversations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=150, help="measure: pretraining steps of the base model")
    ap.add_argument("--sft-steps", type=int, default=600, help="measure: fine-tuning steps")
    ap.add_argument("--write-docs", action="store_true", help="measure: put the table into docs/chat.md")
    args = ap.parse_args(argv)
    if args.command == "data":
        for f in write_data(Path(args.out), args.train, args.test, args.seed):
            print(f"wrote {f}")
        return 0
    table = measure(args)
    print(table)
    if args.write_docs:
        write_docs(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
