"""One command for whoever first has a GPU: does our Triton code work there, and how fast is it?

Our Triton kernels have run only in Triton's CPU interpreter. On a CUDA machine this script
  1. runs the kernel tests on the GPU (tests/test_flash_attention.py, test_paged_attention_kernel.py
     with KERNEL_TEST_DEVICE=cuda: compiled kernels against float64 references),
  2. runs the first-use self-check of each kernel (kernels/self_check.py),
  3. trains a tiny model with attention.backend=sdpa and =triton (GQA and MLA) and compares the losses,
  4. runs the kernel benchmark (scripts/bench_attention.py --check),
and writes everything to one markdown report, ready to paste into the README.

    python scripts/gpu_check.py                     # writes gpu_report.md
    python scripts/gpu_check.py --out report.md
    python scripts/gpu_check.py --smoke             # CPU, Triton interpreter, tiny sizes: checks
                                                    # this script end to end, numbers meaningless

Exit code 0 if every part passed, 1 if one failed (the report says which), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

KERNEL_TESTS = ["tests/test_flash_attention.py", "tests/test_paged_attention_kernel.py"]
# Tests that check CPU-only behaviour (the C++ kernel, the interpreter switch, input errors on CPU).
CPU_ONLY = "not cpu_kernel and not cpu_without_interpreter and not interpreter_switch and not bad_inputs"
# Both backends train in bf16 on CUDA, so their losses drift apart by rounding, not by O(0.1).
LOSS_TOLERANCE = 0.05

# train.py overrides: the tiny model on the default data (the plays, GPU), or a tinier one on the
# README as text (smoke: CPU, where the Triton interpreter takes seconds per step).
TRAIN_GPU = ["model=tiny", "train.max_steps=200", "train.eval_every=100", "train.save_every=200",
             "train.batch_size=32", "train.seq_len=256"]
TRAIN_SMOKE = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
               "model.max_seq_len=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=8", "model.v_head_dim=8", "data=text", f"data.path={ROOT / 'README.md'}",
               "data.vocab_size=300", "data.val_fraction=0.2", "train.max_steps=2", "train.eval_every=2",
               "train.save_every=2", "train.eval_batches=1", "train.batch_size=2", "train.seq_len=32",
               "train.warmup_steps=1", "train.device=cpu"]
TRAIN_COMMON = ["train.log_every=1", "train.sample_tokens=0", "train.progress=false", "wandb.mode=disabled"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="report file (default gpu_report.md)")
    p.add_argument("--smoke", action="store_true",
                   help="run every part in a tiny CPU version (Triton interpreter): checks the script, not the GPU")
    return p.parse_args(argv)


def run(cmd: list[str], workdir: Path, **env) -> subprocess.CompletedProcess:
    """A child process from the repo's python, output captured; env adds variables."""
    return subprocess.run([sys.executable, *cmd], cwd=workdir, env={**os.environ, **env},
                          capture_output=True, text=True)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def code_block(text: str) -> str:
    return "```\n" + text.strip() + "\n```"


# ------------------------------------------------------------------------------------------
# The parts: each takes the device (CPU means --smoke) and a scratch folder, returns (passed, markdown)
# ------------------------------------------------------------------------------------------
def environment(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        gpu = "none: --smoke on CPU, Triton interpreter (checks this script; the numbers mean nothing)"
    return "\n".join([
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- GPU: {gpu}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}",
    ])


def kernel_tests(device: torch.device, workdir: Path) -> tuple[bool, str]:
    smoke = device.type == "cpu"
    select = "autotune" if smoke else CPU_ONLY  # smoke: two quick tests, enough to exercise the part
    cmd = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-k", select,
           *(str(ROOT / t) for t in KERNEL_TESTS)]
    result = run(cmd, workdir, **({} if smoke else {"KERNEL_TEST_DEVICE": "cuda"}))
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    text = f"`pytest -k \"{select}\" {' '.join(KERNEL_TESTS)}`: **{last_line(result.stdout)}**"
    if failed:
        text += "\n\n" + code_block("\n".join(failed))
    return result.returncode == 0, text


def self_check(device: torch.device, workdir: Path) -> tuple[bool, str]:
    from kernels.self_check import check_flash_attention, check_paged_decode, run_check

    rows, passed = ["| kernel | compared with | result |", "|---|---|---|"], True
    for name, reference, check in (("flash attention, forward + backward", "SDPA", check_flash_attention),
                                   ("paged decode, 1 split and split-K", "PyTorch gather path",
                                    check_paged_decode)):
        problem = run_check(check, device)  # a compile or launch failure is a result too
        passed &= problem is None
        rows.append(f"| {name} | {reference} | {'ok' if problem is None else 'FAILED: ' + problem} |")
    return passed, "\n".join(rows)


def losses(out_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def training(device: torch.device, workdir: Path) -> tuple[bool, str]:
    smoke = device.type == "cpu"
    rows = ["| attention | steps | final train loss sdpa / triton | val loss sdpa / triton | max abs diff | result |",
            "|---|---|---|---|---|---|"]
    passed = True
    for attention in ("gqa",) if smoke else ("gqa", "mla"):
        results = {}
        for backend in ("sdpa", "triton"):
            out = workdir / f"train-{attention}-{backend}"
            overrides = (TRAIN_SMOKE if smoke else TRAIN_GPU) + TRAIN_COMMON + [
                f"attention={attention}", f"attention.backend={backend}", f"out_dir={out}",
                f"data.cache_dir={workdir / 'data-cache'}"]
            result = run([str(ROOT / "train.py"), *overrides], workdir)
            results[backend] = losses(out) if result.returncode == 0 else last_line(result.stderr)
        if any(isinstance(r, str) for r in results.values()):
            why = "; ".join(f"{b}: {r}" for b, r in results.items() if isinstance(r, str))
            rows.append(f"| {attention} | | | | | FAILED: {why} |")
            passed = False
            continue
        (train_s, val_s), (train_t, val_t) = results["sdpa"], results["triton"]
        diff = max(abs(a - b) for a, b in zip(train_s + val_s, train_t + val_t))
        ok = len(train_s) == len(train_t) and diff <= LOSS_TOLERANCE
        passed &= ok
        rows.append(f"| {attention} | {len(train_s)} | {train_s[-1]:.4f} / {train_t[-1]:.4f} | "
                    f"{val_s[-1]:.4f} / {val_t[-1]:.4f} | {diff:.2e} | "
                    f"{'ok' if ok else 'FAILED'} (tolerance {LOSS_TOLERANCE}) |")
    return passed, "\n".join(rows)


def benchmark(device: torch.device, workdir: Path) -> tuple[bool, str]:
    smoke = device.type == "cpu"
    args = ["--smoke", "--shapes", "d64", "--seq-lens", "32", "--causal"] if smoke else ["--check"]
    result = run([str(ROOT / "scripts" / "bench_attention.py"), *args], workdir)
    text = f"`python scripts/bench_attention.py {' '.join(args)}`\n\n" + code_block(result.stdout or "(no output)")
    if result.returncode != 0:
        text += "\n\nFAILED: " + last_line(result.stderr)
    return result.returncode == 0, text


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: scripts/gpu_check.py checks our kernels on a GPU "
              "(use --smoke to check the script itself on CPU)", file=sys.stderr)
        return 2
    folder = args.out.parent.resolve()
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        print(f"error: cannot write the report to {args.out}: {folder} is not a writable folder (choose --out)",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: triton is not installed: pip install triton (Linux only)", file=sys.stderr)
        return 2
    if args.smoke:  # our kernels on CPU tensors run in the interpreter; children inherit this
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cpu" if args.smoke else "cuda")

    parts = [("Kernel tests on the GPU", kernel_tests), ("Self-check (kernels/self_check.py)", self_check),
             ("Training: attention.backend=sdpa vs triton", training),
             ("Kernel benchmark (TFLOP/s)", benchmark)]
    sections, verdicts = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for title, part in parts:
            print(f"gpu_check: {title} ...", file=sys.stderr, flush=True)
            passed, text = part(device, Path(tmp))
            verdicts.append(f"- {title}: {'passed' if passed else '**FAILED**'}")
            sections.append(f"## {title}\n\n{text}\n")
    report = "\n".join([f"# GPU check{' (smoke run, CPU)' if args.smoke else ''}", "",
                        environment(device), "", *verdicts, "", *sections])
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(report)
    tmp_out.replace(args.out)  # whole or not at all
    failed = sum("FAILED" in v for v in verdicts)
    print(f"gpu_check: wrote {args.out} ({'all parts passed' if not failed else f'{failed} part(s) FAILED'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
