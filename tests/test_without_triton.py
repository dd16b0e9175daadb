"""Everything on CPU works without triton installed (it has Linux wheels only: requirements.txt
installs it there alone). In a fresh process where `import triton` fails: the model trains
forward and backward, the engine decodes through its CPU path, and only asking for the Triton
backend fails, in one line."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = r"""
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):  # as if triton were not installed
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
sys.path[:0] = ["tests", "."]
import torch
from builders import tiny_model
from engine import LLM, SamplingParams
from model.attention import choose_backend

assert choose_backend("auto", "cpu", torch.float32) == "cpu"  # our C++ kernel, chosen without a Triton check
for attention in ("gqa", "mla"):
    model = tiny_model(attention).train()  # backend "auto": the choice above
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, targets=x)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())

    model.eval()
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(20, 60))]
    paged = [o.token_ids for o in LLM(model=model, device="cpu").generate(prompts, params)]
    recompute = [o.token_ids for o in LLM(model=model, device="cpu", use_cache=False).generate(prompts, params)]
    assert paged == recompute and all(len(t) == 12 for t in paged), (paged, recompute)

try:
    choose_backend("triton", "cpu", torch.float32)
except ValueError as e:
    print(e)
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported"
"""


def test_cpu_paths_run_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ("attention.backend=triton: the triton package is not installed "
                                     "(Linux only: pip install triton): use attention.backend=sdpa or auto")
