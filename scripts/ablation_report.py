"""Summarise an ablation sweep: markdown tables and PNG plots (docs/ablation.md, docs/recipe.md).

    python -m scripts.ablation_report multirun/ablation                         # -> multirun/ablation/report/
    python -m scripts.ablation_report multirun/ablation --serving               # + the serving table (paged engine)
    python -m scripts.ablation_report multirun/recipe_ablation --by train.optimizer,train.lr   # + one row per arm
    python -m scripts.ablation_report multirun/ablation --decode                # + decode tok/s per run at batch 16
    python -m scripts.ablation_report multirun/ablation --wandb                 # + log to wandb (offline)

Every folder under the sweep folder that holds a metrics.jsonl is a run. Its config comes from its last
checkpoint (checkpoints/latest/config.json, the resolved config) or else from Hydra's .hydra/config.yaml;
its numbers from metrics.jsonl. So the report needs neither wandb nor a finished sweep.

Runs are grouped by data source (data.source: the plays, data=recall, ...) and, within one, by variant (the
run's wandb.name) over seeds: each variant's mean and spread, and its paired difference from the first
variant (MHA) with a verdict against the seed noise (scripts/ablation_stats.py). The quality is val bits/byte
on text and the share of answers right on data=recall.

Writes to --out (default <sweep>/report): ablation.md (the tables), ablation.json (the same, raw numbers),
val_loss_vs_tokens.png, val_loss_vs_time.png, quality_vs_kv_bytes.png.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.ablation_stats import SeedError, seed_summary, verdict  # noqa: E402

VARIANT_ORDER = ("mha", "gqa", "mqa", "mla")
PLOTS = {"tokens": "val_loss_vs_tokens.png", "time": "val_loss_vs_time.png", "kv": "quality_vs_kv_bytes.png"}
# The quality each data source is judged by: (the run's field, its name, its unit, number format). Bits/byte
# for text (comparable across tokenizers); for data=recall, what the task is for: answers right.
QUALITY = {"recall": ("final_val_recall_acc", "recall accuracy", "", ".3f")}
TEXT_QUALITY = ("final_val_bpb", "val bits/byte", "bits/byte", ".4f")
DECODE_PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "HAMLET:", "To be", "What", "O, ",
                  "My lord,", "Enter", "Good morrow", "I pray you", "Now", "Come,", "Sweet", "Exeunt"]
# Keys that legitimately differ between the runs of an ablation: what the variant itself sets
# (model.latent_norm_eps: the MLA preset's latent-norm eps, read only by MLA), the seed that repeats each
# variant, and what does not change the training.
VARIANT_KEYS = {"model.attention", "model.n_kv_heads", "model.latent_norm_eps", "seed", "wandb", "out_dir",
                "data.num_proc", "data.cache_dir", "train.progress", "train.resume", "train.device",
                "attention.backend"}


class ReportError(RuntimeError):
    pass


# ---- reading runs ---------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                continue
    return rows


def read_config(run_dir: Path) -> tuple[dict, str]:
    """The run's resolved config and where it came from."""
    ckpt_cfg = run_dir / "checkpoints" / "latest" / "config.json"
    if ckpt_cfg.exists():
        return json.loads(ckpt_cfg.read_text()), "checkpoint"
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        from omegaconf import OmegaConf

        from training.ablation import register_resolvers

        register_resolvers()
        cfg = OmegaConf.load(hydra_cfg)
        out = {}
        for section in ("model", "data", "train", "wandb", "seed"):
            out[section] = _resolve_leniently(cfg, section)
        # train.py sets model.vocab_size from the tokenizer; before the first checkpoint only the
        # requested size is known (exact unless data.tokenizer_path points at another tokenizer).
        if isinstance(out.get("model"), dict) and isinstance(out.get("data"), dict):
            out["model"]["vocab_size"] = out["data"].get("vocab_size", out["model"].get("vocab_size"))
        return out, "hydra"
    raise ReportError(f"{run_dir}: no checkpoints/latest/config.json nor .hydra/config.yaml to read the config from")


def _resolve_leniently(cfg, key: str):
    """Resolve cfg[key], leaving values that need a running Hydra app (${hydra:...}) as None."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = cfg.get(key)
    if not OmegaConf.is_config(node):
        try:
            return OmegaConf.select(cfg, key)
        except OmegaConfBaseException:
            return None
    out = {}
    for k in node:
        try:
            v = OmegaConf.select(cfg, f"{key}.{k}")
            out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        except OmegaConfBaseException:
            out[k] = None
    return out


def model_config(model: dict):
    from model import ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in model.items() if k in known})


def count_params(model: dict) -> int:
    """Exact, from the config: the Transformer built on the meta device (no weights needed)."""
    from model import ModelConfig
    from training.ablation import count_params as count

    known = {f.name for f in fields(ModelConfig)}
    return count({k: v for k, v in model.items() if k in known})


def find_runs(sweep: Path) -> list[Path]:
    runs = sorted({p.parent for p in sweep.rglob("metrics.jsonl") if "checkpoints" not in p.parts},
                  key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep).parts])
    if not runs:
        raise ReportError(f"no run folders (with a metrics.jsonl) under {sweep}")
    return runs


def summarise_run(run_dir: Path, sweep: Path) -> dict:
    cfg, source = read_config(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    model = cfg["model"]
    mc = model_config(model)
    wandb_cfg = cfg.get("wandb") or {}
    name = wandb_cfg.get("name") or mc.attention
    last = evals[-1] if evals else {}
    tok_s = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    return {
        "variant": name,
        "attention": mc.attention,
        "data": (cfg.get("data") or {}).get("source"),
        "seed": cfg.get("seed"),
        "run_dir": str(run_dir.relative_to(sweep)) if run_dir != sweep else ".",
        "config_source": source,
        "params": count_params(model),
        "n_layers": mc.n_layers,
        "context": mc.max_seq_len,
        "kv_bytes_per_token_per_layer": mc.kv_cache_bytes_per_token(2, per_layer=True),
        "kv_bytes_per_token": mc.kv_cache_bytes_per_token(2),
        "kv_bytes_per_sequence": mc.kv_cache_bytes_per_token(2) * mc.max_seq_len,
        "final_step": train[-1]["step"] if train else 0,
        "final_tokens": train[-1]["tokens"] if train else 0,
        "final_val_step": last.get("step"),
        "final_val_loss": last.get("val_loss"),
        "final_val_bpb": last.get("val_bpb"),
        "final_val_recall_acc": last.get("val_recall_acc"),
        "train_tokens_per_s": statistics.median(tok_s) if tok_s else None,
        "elapsed_s": max((r.get("elapsed_s", 0.0) for r in records), default=0.0),
        "decode_tokens_per_s": None,
        "curve": [{"step": r["step"], "tokens": r["tokens"], "elapsed_s": r.get("elapsed_s"),
                   "val_loss": r["val_loss"], "val_bpb": r.get("val_bpb")} for r in evals],
        "_config": cfg,
    }


def sort_key(row: dict):
    """Text before data=recall, then MHA, GQA, MQA, MLA, then seeds: the first variant is the reference."""
    a = row["attention"]
    return (row["data"] == "recall", str(row["data"]), VARIANT_ORDER.index(a) if a in VARIANT_ORDER else
            len(VARIANT_ORDER), row["variant"], str(row["seed"]), row["run_dir"])


def by_data(rows: list[dict]) -> dict[str, list[dict]]:
    """The runs of each data source, in order: only runs on the same data are compared."""
    out = {}
    for r in rows:
        out.setdefault(r["data"], []).append(r)
    return out


def quality(data: str) -> tuple:
    return QUALITY.get(data, TEXT_QUALITY)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(rows: list[dict], by: tuple = ()) -> list[str]:
    """Config keys that differ between runs on the same data beyond the variant itself and its seed (or the
    arm's keys `by`): each one makes the comparison unfair."""
    return sorted({k for runs in by_data(rows).values() for k in _differences(runs, by)})


def _differences(rows: list[dict], by: tuple) -> list[str]:
    flats = [flatten(r["_config"]) for r in rows]
    keys = set().union(*flats)
    ignore = set(VARIANT_KEYS) | set(by)
    if all("matched_params" in ((r["_config"].get("wandb") or {}).get("tags") or []) for r in rows):
        ignore.add("model.ffn_dim")  # attention_ablation_matched: the FFN width is the variable that matches params
    diff = []
    for k in sorted(keys):
        if k in ignore or any(k.startswith(p + ".") for p in ignore):
            continue
        values = {json.dumps(f.get(k), sort_keys=True) for f in flats}
        if len(values) > 1:
            diff.append(k)
    return diff


def arm_name(row: dict, by: tuple) -> str:
    """The run's values of the config keys `by`, e.g. "train.optimizer=muon, train.lr=0.004"."""
    flat = flatten(row["_config"])
    missing = [k for k in by if k not in flat]
    if missing:
        raise ReportError(f"--by {missing[0]}: no such key in the config of {row['run_dir']} (keys look like "
                          "train.optimizer, model.dim, seed)")
    return ", ".join(f"{k}={flat[k]}" for k in by)


def arms(rows: list[dict]) -> list[dict]:
    """The runs grouped into arms by their variant, which report() has set to their values of --by's keys (see
    arm_name): each arm's final val bits/byte per seed, and the means over its seeds."""
    groups = {}
    for r in rows:  # an arm per data source: runs on different data are never averaged together
        groups.setdefault((r["variant"], r["data"]), []).append(r)
    out = []
    for (name, data), runs in groups.items():
        done = [r for r in runs if r["final_val_bpb"] is not None]
        mean = lambda key: statistics.mean(r[key] for r in done) if done else None  # noqa: E731
        out.append({"arm": name, "data": data, "bpb_by_seed": {r["_config"]["seed"]: r["final_val_bpb"] for r in runs},
                    "val_bpb": mean("final_val_bpb"), "val_loss": mean("final_val_loss"),
                    "minutes": statistics.mean(r["elapsed_s"] for r in runs) / 60,
                    "train_tokens_per_s": statistics.mean(r["train_tokens_per_s"] or 0.0 for r in runs)})
    return out


def arm_table(arm_rows: list[dict]) -> list[str]:
    seeds = sorted({s for a in arm_rows for s in a["bpb_by_seed"]})
    cols = ["arm", "data", *[f"seed {s}" for s in seeds], "mean val bits/byte", "mean val loss", "minutes",
            "train tok/s"]
    return md_table(cols, [[a["arm"], str(a["data"]), *[fmt(a["bpb_by_seed"].get(s), ".4f") for s in seeds],
                            fmt(a["val_bpb"], ".4f"), fmt(a["val_loss"], ".4f"), fmt(a["minutes"], ".1f"),
                            fmt(a["train_tokens_per_s"], ",.0f")]
                           for a in arm_rows])


# ---- decode throughput (the paged engine) ---------------------------------------------------------

def decode_tokens_per_s(run_dir: Path, batch: int, new_tokens: int, device: str = "cpu") -> float:
    """Decode tokens/s of the run's last checkpoint: `batch` prompts decoded together, greedy, EOS ignored."""
    try:
        from engine import LLM, SamplingParams
    except ImportError as e:
        raise ReportError(f"--decode needs the paged engine (engine/: LLM, SamplingParams), not importable here: {e}")
    llm = LLM(str(run_dir), device=device)
    prompts = [DECODE_PROMPTS[i % len(DECODE_PROMPTS)] for i in range(batch)]
    ctx = llm.cfg.max_seq_len if hasattr(llm, "cfg") else None
    n = min(new_tokens, ctx - 16) if ctx else new_tokens  # room for the prompt within the context
    llm.generate(prompts[:2], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
    wall = time.perf_counter() - t0
    stats = getattr(llm, "stats", None)
    rate = getattr(stats, "decode_tokens_per_s", 0.0) if stats is not None else 0.0
    if rate:  # time in decode steps only (prefill excluded)
        return float(rate)
    produced = sum(len(getattr(o, "token_ids", []) or []) for o in outs) or batch * n
    return produced / wall


def serving_rows(rows: list[dict], sweep: Path, opts) -> list[dict]:
    """--serving: each variant's first run (text before data=recall, the lowest seed) in one KV budget."""
    from scripts.ablation_serving import serving_row

    first = {}
    for r in rows:
        first.setdefault(r["variant"], r)
    out = []
    for variant, r in first.items():
        if r["config_source"] != "checkpoint":
            raise ReportError(f"--serving needs a checkpoint of every variant; {r['run_dir']} ({variant}) has none yet")
        new = opts.new_tokens or r["context"] - opts.prompt_tokens
        if opts.prompt_tokens < 1 or new < 1 or opts.prompt_tokens + new > r["context"]:
            raise ReportError(f"--serving-prompt {opts.prompt_tokens} + --serving-tokens {new} must be positive and "
                              f"fit {variant}'s context of {r['context']} tokens")
        try:
            measured = serving_row(sweep / r["run_dir"], int(opts.budget_mib * 2 ** 20), opts.prompt_tokens, new)
        except ValueError as e:
            raise ReportError(str(e)) from None
        out.append({"variant": variant, "run_dir": r["run_dir"], "prompt_tokens": opts.prompt_tokens,
                    "new_tokens": new, **measured})
    return out


# ---- output -----------------------------------------------------------------------------------------

def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}".replace(".00 ", " ")
    return f"{int(n)} B"


def fmt(x, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def fmt_pm(mean, std, spec: str) -> str:
    """'1.9234 ± 0.0040' (the mean alone with one seed)."""
    return fmt(mean, spec) + ("" if std is None else f" ± {format(std, spec.lstrip('+'))}")


def md_table(cols: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A markdown table, its first `text_columns` columns left-aligned, the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(cols) - text_columns)
    return ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|", *["| " + " | ".join(r) + " |" for r in rows]]


TABLE_COLUMNS = ["variant", "data", "seed", "params", "KV B/token/layer", "KV B/token", "KV @ context", "val loss",
                 "val bits/byte", "recall acc", "train tok/s", "decode tok/s @ batch {batch}"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["variant"], str(r["data"]), str(r["seed"]), f"{r['params']:,}", str(r["kv_bytes_per_token_per_layer"]),
             f"{r['kv_bytes_per_token']:,}", fmt_bytes(r["kv_bytes_per_sequence"]), fmt(r["final_val_loss"], ".4f"),
             fmt(r["final_val_bpb"], ".4f"), fmt(r["final_val_recall_acc"], ".3f"),
             fmt(r["train_tokens_per_s"], ",.0f"), fmt(r["decode_tokens_per_s"], ",.0f")] for r in rows]


SEED_COLUMNS = ["data", "variant", "KV B/token", "params", "seeds", "{name} (mean ± std)", "Δ vs {ref} (mean ± std)",
                "95% interval of Δ", "exceeds seed spread"]


def seed_rows(data: str, runs: list[dict], summary: list[dict]) -> list[list[str]]:
    """One row per variant of `summary` (ablation_stats.seed_summary of the runs on `data`)."""
    spec, first = quality(data)[3], {}
    for r in runs:
        first.setdefault(r["variant"], r)
    out = []
    for e in summary:
        r, d = first[e["variant"]], e["diff"]
        interval = "—" if d is None or d["low"] is None else f"{d['low']:+{spec}} to {d['high']:+{spec}}"
        exceeds = "—" if d is None or d["exceeds"] is None else ("yes" if d["exceeds"] else "no")
        out.append([str(data), e["variant"], f"{r['kv_bytes_per_token']:,}", f"{r['params']:,}", str(e["n"]),
                    fmt_pm(e["mean"], e["std"], spec), "—" if d is None else fmt_pm(d["mean"], d["std"], "+" + spec),
                    interval, exceeds])
    return out


def seed_section(data: str, runs: list[dict], summary: list[dict]) -> list[str]:
    _, name, unit, spec = quality(data)
    ref = summary[0]["variant"] if summary else "—"
    m, t = runs[0]["_config"]["model"], runs[0]["_config"].get("train", {})
    steps = "/".join(str(s) for s in sorted({r["final_step"] for r in runs}))
    tokens = "/".join(f"{n:,}" for n in sorted({r["final_tokens"] for r in runs}))
    seeds = ", ".join(sorted({str(r["seed"]) for r in runs}))
    setting = (f"dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} query heads, context {m['max_seq_len']}, "
               f"vocab {m['vocab_size']}; batch {t.get('batch_size')} x {t.get('seq_len')} tokens; "
               f"{steps} steps ({tokens} tokens); seeds {seeds}")
    cols = [c.format(name=name, ref=ref) for c in SEED_COLUMNS]
    return [f"### {data}: {name}", "", setting, "", *md_table(cols, seed_rows(data, runs, summary), 2), "",
            *[f"- {verdict(e, unit, '+' + spec)}." for e in summary[1:]], ""]


SERVING_COLUMNS = ["variant", "checkpoint", "KV B/token (fp32)", "largest batch", "decode tok/s at that batch",
                   "preemptions", "load (1 min)"]


def serving_section(serving: list[dict], opts) -> list[str]:
    rows = [[s["variant"], s["run_dir"], f"{s['kv_bytes_per_token']:,}", str(s["batch"]),
             fmt(s["decode_tokens_per_s"], ",.0f"), str(s["preemptions"]), f"{s['loadavg']:.2f}"] for s in serving]
    s0 = serving[0]
    return ["### Serving: what the smaller cache buys", "",
            f"Paged engine (engine.LLM) on the CPU, fp32, the same KV budget for every variant: "
            f"{fmt_bytes(opts.budget_mib * 2 ** 20)} ({s0['num_blocks']:,} blocks of 16 tokens for the first "
            f"variant). Each sequence: {s0['prompt_tokens']} random prompt tokens + {s0['new_tokens']} greedy new "
            "tokens, EOS ignored, prefix caching off. Largest batch: the most sequences the budget holds at once; "
            "decode tok/s: tokens from decode steps / time in decode steps, that batch decoded together. "
            "Load: the 1-minute load average as each measurement began (2 cores: above 2, the figures are low).", "",
            *md_table(SERVING_COLUMNS, rows, 2), ""]


def markdown(rows: list[dict], sweep: Path, plots: dict, diffs: list[str], batch: int, decoded: bool,
             seeds: dict, arm_rows: Optional[list[dict]] = None, serving: Optional[list[dict]] = None,
             serving_opts=None) -> str:
    out = [f"# Ablation: {sweep}", "", "## Over seeds", "",
           "Δ: the paired difference from the first variant, seed by seed (scripts/ablation_stats.py); it exceeds the "
           "seed-to-seed spread when its 95% interval (Student's t over the seeds) excludes zero.", ""]
    for data, runs in by_data(rows).items():
        out += seed_section(data, runs, seeds[data])
    if serving:
        out += serving_section(serving, serving_opts)
    cols = [c.format(batch=batch) for c in TABLE_COLUMNS]
    out += ["## Runs", "", *md_table(cols, table_rows(rows), 2), ""]
    if arm_rows:
        out += ["Per arm (seed columns: val bits/byte of each run; means over the arm's seeds; minutes: wall-clock "
                "of a run, mean):", "", *arm_table(arm_rows), ""]
    out += [
        "- **params**: all parameters, embeddings included; **KV B/token/layer**: bytes of KV cache one token costs "
        "in one layer at inference, bf16 (MHA/GQA/MQA: 2 x kv heads x head dim; MLA: latent + rope dims); "
        "**KV B/token**: the same for all layers; **KV @ context**: one sequence filling the context, all layers.",
        "- **val loss**, **val bits/byte**: the last evaluation (mean cross-entropy in nats per token; bits per "
        "UTF-8 byte of validation text, comparable across tokenizers). **recall acc** (data=recall): the share of "
        "the held-out answers whose top prediction is right (data/recall.py).",
        "- **train tok/s**: median of the logged training throughputs (tokens / s between log lines); only "
        "comparable between runs made on the same, equally loaded machine.",
        f"- **decode tok/s @ batch {batch}**: " + (
            f"greedy decoding of {batch} prompts together on the paged engine (tokens from decode steps / time in "
            "decode steps)." if decoded else "not measured: run the report with `--decode` (needs engine/)."),
    ]
    if diffs:
        out += ["", f"**Not a like-for-like comparison**: runs on the same data also differ in {', '.join(diffs)}."]
    partial = [f"{r['variant']} (seed {r['seed']})" for r in rows if r["config_source"] != "checkpoint"]
    if partial:
        out += ["", f"No checkpoint yet for {', '.join(partial)}: config read from .hydra/config.yaml "
                    "(parameter counts assume vocab = data.vocab_size)."]
    out += [""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    return "\n".join(out) + "\n"


def _axes(plt, datas: list[str]):
    fig, axes = plt.subplots(1, len(datas), figsize=(6.4 * len(datas), 4.2), dpi=120, squeeze=False)
    return fig, dict(zip(datas, axes[0]))


def _curves(plt, rows: list[dict], colors: dict, xlabel: str, xfn, path: Path) -> None:
    """Validation loss against x, one panel per data source, one line per run (a colour per variant)."""
    groups = by_data(rows)
    fig, axes = _axes(plt, list(groups))
    for data, runs in groups.items():
        ax, labelled = axes[data], set()
        for r in runs:
            if r["curve"]:
                label = None if r["variant"] in labelled else r["variant"]
                labelled.add(r["variant"])
                ax.plot([xfn(c) for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker="o", ms=3,
                        label=label, color=colors[r["variant"]], alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{data}: validation loss vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _quality_vs_kv(plt, rows: list[dict], seeds: dict, colors: dict, path: Path) -> None:
    """Each variant's quality (mean, std over seeds as error bars) against its KV bytes per token."""
    groups = by_data(rows)
    fig, axes = _axes(plt, list(groups))
    for data, runs in groups.items():
        ax, kv = axes[data], {r["variant"]: r["kv_bytes_per_token"] for r in runs}
        for e in seeds[data]:
            ax.errorbar(kv[e["variant"]], e["mean"], yerr=e["std"] or 0.0, fmt="o", ms=6, capsize=5,
                        color=colors[e["variant"]])
            ax.annotate(e["variant"], (kv[e["variant"]], e["mean"]), textcoords="offset points", xytext=(6, 4))
        vocab = (runs[0]["_config"].get("data") or {}).get("recall_vocab") if data == "recall" else None
        if vocab:  # what a guess among the values scores
            ax.axhline(1 / vocab, ls="--", color="grey", lw=1, label=f"a guess (1/{vocab})")
            ax.legend(loc="upper right")
        xs = sorted({kv[e["variant"]] for e in seeds[data]})
        if xs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [fmt_bytes(x) for x in xs])
            ax.minorticks_off()
            ax.set_xlim(xs[0] / 1.5, xs[-1] * 1.5)
        ax.margins(y=0.15)  # room for the labels
        ax.set_xlabel("KV cache per token, all layers (bf16)")
        ax.set_ylabel(f"final {quality(data)[1]} (mean ± std over seeds)")
        ax.set_title(f"{data}: quality vs KV memory")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def make_plots(rows: list[dict], seeds: dict, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}  # one colour per variant in every plot
    paths = {key: out / name for key, name in PLOTS.items()}
    _curves(plt, rows, colors, "training tokens", lambda c: c["tokens"], paths["tokens"])
    _curves(plt, rows, colors, "wall-clock (minutes)", lambda c: (c["elapsed_s"] or 0.0) / 60, paths["time"])
    _quality_vs_kv(plt, rows, seeds, colors, paths["kv"])
    return paths


def log_to_wandb(rows: list[dict], seeds: dict, serving: Optional[list[dict]], plots: dict, sweep: Path, out: Path,
                 mode: str, batch: int) -> str:
    import wandb

    cfgs = [r["_config"].get("wandb") or {} for r in rows]
    groups = {c.get("group") for c in cfgs if c.get("group")}
    group = groups.pop() if len(groups) == 1 else f"attention_ablation {sweep}"
    project = next((c.get("project") for c in cfgs if c.get("project")), "small-llm")
    run = wandb.init(mode=mode, project=project, group=group, name="ablation-report", job_type="report",
                     tags=["attention_ablation", "report"], dir=os.environ.get("WANDB_DIR", str(out)),
                     config={"sweep": str(sweep), "runs": [r["run_dir"] for r in rows]},
                     settings=wandb.Settings(silent=True, console="off"))
    cols = [c.format(batch=batch) for c in TABLE_COLUMNS]
    raw_cols = ["variant", "data", "seed", "params", "kv_bytes_per_token_per_layer", "kv_bytes_per_token",
                "kv_bytes_per_sequence", "final_val_loss", "final_val_bpb", "final_val_recall_acc",
                "train_tokens_per_s", "decode_tokens_per_s"]
    seed_cols = [c.format(name="quality", ref="reference") for c in SEED_COLUMNS]
    tables = {"ablation_table": wandb.Table(columns=cols, data=table_rows(rows)),
              "ablation_values": wandb.Table(columns=raw_cols, data=[[r[c] for c in raw_cols] for r in rows]),
              "seed_table": wandb.Table(columns=seed_cols, data=[row for data, runs in by_data(rows).items()
                                                                  for row in seed_rows(data, runs, seeds[data])])}
    if serving:
        tables["serving_table"] = wandb.Table(columns=list(serving[0]), data=[list(s.values()) for s in serving])
    run.log({**tables, **{path.stem: wandb.Image(str(path)) for path in plots.values()}})
    run_dir = run.dir
    run.finish()
    return run_dir


def report(sweep: Path, out: Optional[Path] = None, decode: bool = False, batch: int = 16, new_tokens: int = 128,
           use_wandb: bool = False, wandb_mode: str = "offline", by: tuple = (), serving=None) -> dict:
    """`by`: config keys whose values make the arms (a table of the arms' means over seeds). `serving`: None, or
    the options of the serving measurement (scripts/ablation_serving.Serving)."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise ReportError(f"sweep folder {sweep} does not exist")
    out = Path(out) if out is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((summarise_run(d, sweep) for d in find_runs(sweep)), key=sort_key)
    for r in rows if by else ():  # the arms are the variants: runs of one wandb.name may differ in a key of `by`
        r["variant"] = arm_name(r, by)
    try:
        seeds = {data: seed_summary(runs, quality(data)[0]) for data, runs in by_data(rows).items()}
    except SeedError as e:
        raise ReportError(str(e)) from None
    if decode:
        for r in rows:
            r["decode_tokens_per_s"] = decode_tokens_per_s(sweep / r["run_dir"], batch, new_tokens)
    served = serving_rows(rows, sweep, serving) if serving is not None else None
    plots = make_plots(rows, seeds, out)
    diffs = config_differences(rows, by)
    arm_rows = arms(rows) if by else []
    (out / "ablation.md").write_text(markdown(rows, sweep, plots, diffs, batch, decode, seeds, arm_rows, served,
                                              serving))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    (out / "ablation.json").write_text(json.dumps({"sweep": str(sweep), "decode_batch": batch,
                                                   "config_differences": diffs, "runs": public, "seeds": seeds,
                                                   "arms": arm_rows, "serving": served}, indent=1))
    result = {"out": out, "rows": public, "seeds": seeds, "arms": arm_rows, "serving": served, "plots": plots,
              "differences": diffs, "wandb_dir": None}
    if use_wandb:
        result["wandb_dir"] = log_to_wandb(rows, seeds, served, plots, sweep, out, wandb_mode, batch)
    return result


def main(argv=None) -> int:
    from scripts.ablation_serving import Serving

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="the sweep folder (multirun/<date>/<time>) or any folder of run folders")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: <sweep>/report)")
    ap.add_argument("--serving", action="store_true", help="for each variant, the largest batch that fits one KV "
                    "budget on the paged engine and decode tokens/s at that batch")
    ap.add_argument("--serving-budget", type=float, default=Serving.budget_mib, help="the KV budget in MiB (fp32)")
    ap.add_argument("--serving-prompt", type=int, default=Serving.prompt_tokens, help="prompt tokens per sequence")
    ap.add_argument("--serving-tokens", type=int, default=None, help="new tokens per sequence (default: up to the "
                    "model's context)")
    ap.add_argument("--decode", action="store_true", help="measure decode tokens/s of every run at --decode-batch")
    ap.add_argument("--decode-batch", type=int, default=16, help="prompts decoded together (default 16)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="new tokens per prompt (capped by the context)")
    ap.add_argument("--by", default="", help="config keys that make the arms, comma-separated (train.optimizer,"
                    "train.lr): adds a table of each arm's seeds and means")
    ap.add_argument("--wandb", action="store_true", help="log the tables and plots to a wandb run in the sweep's group")
    ap.add_argument("--wandb-mode", default="offline", choices=["offline", "online"])
    args = ap.parse_args(argv)
    serving = Serving(args.serving_budget, args.serving_prompt, args.serving_tokens) if args.serving else None
    try:
        res = report(args.sweep, args.out, args.decode, args.decode_batch, args.decode_tokens, args.wandb,
                     args.wandb_mode, tuple(k for k in args.by.split(",") if k), serving)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((res["out"] / "ablation.md").read_text())
    print(f"report: {res['out'] / 'ablation.md'}")
    if res["wandb_dir"]:
        print(f"wandb:  {Path(res['wandb_dir']).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
