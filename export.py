"""Export a model for other tools: a Hugging Face folder (transformers, vLLM, the Hub) or a GGUF file (llama.cpp).

    python export.py --ckpt out/tiny --format hf --out exports/tiny-hf
    python export.py --ckpt out/tiny --format hf --out exports/tiny-hf --dtype bfloat16
    python export.py --ckpt out/tiny --format gguf --out exports/tiny.gguf --outtype q8_0

--ckpt takes what generate.py takes: a run folder, its checkpoints/ folder, one checkpoint, or a Hugging
Face folder (so a HF Llama converts to GGUF too). MHA/GQA/MQA become LlamaForCausalLM / GGUF arch
`llama`; MLA becomes DeepseekV3ForCausalLM with dense layers / GGUF arch `deepseek2` (see
checkpoint/hf.py and checkpoint/gguf.py for the layouts and the latent-norm eps condition).

Nothing is overwritten in place: the export is written under a temporary name beside --out and renamed
once whole, so a failure leaves no half-written output and an earlier export is replaced only by a
complete one. An existing non-empty --out is refused unless --force, and an --out that is, holds or lies
inside what --ckpt reads (the run, its checkpoint, the tokenizer) is always refused: --force would replace
the source. Missing parent folders of --out are created. Bad input prints one line `error: ...` on stderr
and exits with 2.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_pretrained
from checkpoint.gguf import OUTTYPES, write_gguf
from checkpoint.hf import write_hf_folder

FORMATS = ("hf", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """Bad input to the export: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise ExportError(f"{message} (see --help)")


def model_card(p, name: str) -> str:
    """A short README.md: what the model is, how it was trained (config, data), how well, how to load it."""
    cfg, run = p.config, p.run_config
    arch = "DeepseekV3ForCausalLM (MLA, dense)" if cfg.attention == "mla" else f"LlamaForCausalLM ({cfg.attention})"
    origin = "trained with small-llm" if run is not None else f"converted by small-llm from {p.dir.name}"
    lines = ["---", "library_name: transformers", "tags: [small-llm]", "---", "", f"# {name}", "",
             f"A {cfg.n_layers}-layer, {cfg.dim}-wide {arch}, {origin} and exported by `export.py`.", ""]
    metrics = p.dir.parent.parent / "metrics.jsonl"  # <run>/checkpoints/step_N -> <run>/metrics.jsonl
    if run is not None and metrics.is_file():
        step = float("inf") if p.step is None else p.step
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().startswith("{")]
        evals = [r for r in rows if "val_loss" in r and r.get("step", 0) <= step]
        if evals:  # the last evaluation up to this checkpoint's step
            r = evals[-1]
            lines += [f"Final validation (step {r['step']}): loss {r['val_loss']:.4f}, "
                      f"bits per byte {r.get('val_bpb', float('nan')):.4f}.", ""]
    if run and run.get("data"):
        lines += ["## Data", "", "```json", json.dumps(run["data"], indent=2), "```", ""]
    if run:
        lines += ["## Training config", "", "```json",
                  json.dumps({k: run[k] for k in ("model", "train") if k in run}, indent=2), "```", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tok = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    return "\n".join(lines)


def sources(args, p) -> list[Path]:
    """What the export reads: the run holding the checkpoint (<run>/checkpoints/step_N), --ckpt as given, the
    checkpoint folder it resolved to, and the tokenizer."""
    run = [p.dir.parent.parent] if p.dir.parent.name == "checkpoints" else []
    return run + [Path(args.ckpt).expanduser().resolve(), p.dir, p.tokenizer_path.resolve()]


def check_out(out: Path, args, p) -> None:
    """Refuse an --out that overlaps the source (replacing it would delete what is being exported) or, without
    --force, holds something; create its missing parent folders."""
    target = out.resolve()
    for src in sources(args, p):
        if target.is_relative_to(src) or src.is_relative_to(target):
            where = "is" if target == src else "is inside" if target.is_relative_to(src) else "holds"
            raise ExportError(f"--out {out} {where} {src}, which --ckpt {args.ckpt} reads: writing there would "
                              "destroy the source; choose an --out outside it (e.g. exports/NAME)")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.force:
        raise ExportError(f"--out {out} exists and is not empty: choose another path or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create the folder {out.parent} ({e.strerror or e})") from None


def export(args) -> Path:
    p = load_pretrained(args.ckpt, args.tokenizer)
    out = Path(args.out).expanduser()
    check_out(out, args, p)
    # Build beside the target (same filesystem, so the final rename is atomic), then swap it in.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        if args.format == "hf":
            built = tmp / "model"
            write_hf_folder(built, p.config, p.state_dict, p.tokenizer_path, p.eos_id, DTYPES[args.dtype],
                            card=model_card(p, out.name), chat_template=p.chat_template)
        else:
            built = tmp / "model.gguf"
            write_gguf(built, p.config, p.state_dict, p.tokenizer_path, p.eos_id, args.outtype, name=out.stem,
                       chat_template=p.chat_template)
        old = tmp / "old"
        if out.exists():  # --force: the old output goes only once the new one is whole
            os.replace(out, old)
        try:
            os.replace(built, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    except OSError as e:
        raise ExportError(f"could not write {out} ({e.strerror or e}); nothing was changed there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or Hugging Face folder")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="output folder (hf) or file (gguf)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="hf: weight dtype")
    ap.add_argument("--outtype", default="f32", choices=list(OUTTYPES), help="gguf: weight type (norms stay f32)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    ap.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    try:
        args = ap.parse_args(argv)
        out = export(args)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
