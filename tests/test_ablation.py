"""The attention ablation end to end: a tiny two-variant sweep through Hydra multirun (the preset, its
sweeper default overridden on the command line, wandb offline), then the report (table, numbers,
plots, decode column, wandb logging), and the matched-parameter preset."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose_config, tiny_overrides
from test_train import read_wandb_records

from scripts import ablation_report

PNG = b"\x89PNG\r\n\x1a\n"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def kv_bytes_by_hand(m: dict) -> int:
    """bf16 KV bytes per token per layer, from the dims (not through ModelConfig)."""
    if m["attention"] == "mla":
        return 2 * (m["kv_lora_rank"] + m["qk_rope_head_dim"])
    return 2 * 2 * m["n_kv_heads"] * (m["dim"] // m["n_heads"])


def safetensors_params(run: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(run / "checkpoints" / "latest" / "model.safetensors").values())


@pytest.fixture(scope="module")
def sweep(corpus, data_cache, tmp_path_factory):
    """`python train.py -m +experiment=attention_ablation attention=gqa,mla <tiny>`: one subprocess, two runs."""
    tmp = tmp_path_factory.mktemp("ablation")
    wandb_dir = tmp / "wandb_dir"
    wandb_dir.mkdir()
    tiny = [a for a in tiny_overrides(corpus, data_cache, tmp / "unused")
            if not a.startswith(("out_dir=", "wandb.mode="))]  # each run gets its own Hydra folder; wandb on
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "+experiment=attention_ablation",
                           "attention=gqa,mla", *tiny, f"hydra.sweep.dir={tmp / 'sweep'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep", wandb_dir


def test_sweep_has_one_run_per_variant_with_wandb(sweep):
    folder, wandb_dir = sweep
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    configs = [json.loads((r / "checkpoints" / "latest" / "config.json").read_text()) for r in runs]
    assert [c["model"]["attention"] for c in configs] == ["gqa", "mla"]  # the command line beat the preset's sweep
    for run, c in zip(runs, configs):
        evals = [r for r in metrics(run) if "val_loss" in r]
        assert [r["step"] for r in evals] == [3, 6]  # the tiny overrides beat the preset's budget and cadence
        assert c["model"]["dim"] == 32 and c["data"]["source"] == "text"
        assert c["wandb"]["group"] == f"attention_ablation {folder}"
        assert c["wandb"]["name"] == c["model"]["attention"]
        assert c["wandb"]["tags"] == ["attention_ablation", c["model"]["attention"]]

    offline = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    from wandb.proto import wandb_internal_pb2

    seen = {}
    for run_dir in offline:
        summary, group, name = {}, None, None
        for data in read_wandb_records(next(run_dir.glob("*.wandb"))):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                group, name = rec.run.run_group, rec.run.display_name
            elif kind == "summary":
                summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
        seen[name] = (group, summary)
    assert set(seen) == {"gqa", "mla"}
    for name, (group, summary) in seen.items():
        run = runs[["gqa", "mla"].index(name)]
        assert group == f"attention_ablation {folder}"
        m = metrics(run)
        assert summary["final_val_loss"] == pytest.approx([r for r in m if "val_loss" in r][-1]["val_loss"])
        assert summary["train_tokens_per_s"] == pytest.approx(
            statistics.median(r["tokens_per_s"] for r in m if "tokens_per_s" in r))
        assert summary["params"] > 0 and summary["kv_bytes_per_token"] > 0 and "final_val_bpb" in summary


def table(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(head, r)) for r in rows}


def test_report_table_and_plots_match_the_runs(sweep, tmp_path, capsys):
    folder, _ = sweep
    out = tmp_path / "report"
    assert ablation_report.main([str(folder), "--out", str(out)]) == 0
    assert "| gqa |" in capsys.readouterr().out
    rows = table((out / "ablation.md").read_text())
    assert list(rows) == ["gqa", "mla"]
    for i, variant in enumerate(["gqa", "mla"]):
        run = folder / str(i)
        m = json.loads((run / "checkpoints" / "latest" / "config.json").read_text())["model"]
        per_layer = kv_bytes_by_hand(m)
        evals = [r for r in metrics(run) if "val_loss" in r]
        tok_s = statistics.median(r["tokens_per_s"] for r in metrics(run) if "tokens_per_s" in r)
        row = rows[variant]
        assert row["params"] == f"{safetensors_params(run):,}"
        assert row["KV B/token/layer"] == str(per_layer)
        assert row["KV B/token"] == f"{per_layer * m['n_layers']:,}"
        assert row["KV @ context"] == f"{per_layer * m['n_layers'] * m['max_seq_len'] // 1024} KiB"
        assert row["val loss"] == f"{evals[-1]['val_loss']:.4f}"
        assert row["val bits/byte"] == f"{evals[-1]['val_bpb']:.4f}"
        assert row["train tok/s"] == f"{tok_s:,.0f}"
        assert row["decode tok/s @ batch 16"] == "—"
    raw = json.loads((out / "ablation.json").read_text())
    assert raw["config_differences"] == []
    assert [len(r["curve"]) for r in raw["runs"]] == [2, 2]
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "val_loss_vs_kv_bytes.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
        assert f"]({name})" in (out / "ablation.md").read_text()


@pytest.mark.slow  # about 40 s of decoding: make test is at its 10-minute budget
def test_report_decode_column(sweep, tmp_path):
    folder, _ = sweep
    res = ablation_report.report(folder, tmp_path / "r", decode=True, batch=16, new_tokens=6)
    assert all(r["decode_tokens_per_s"] > 0 for r in res["rows"])
    rows = table((tmp_path / "r" / "ablation.md").read_text())
    assert all(float(r["decode tok/s @ batch 16"].replace(",", "")) > 0 for r in rows.values())


def test_report_logs_table_and_plots_to_wandb(sweep, tmp_path, monkeypatch):
    folder, _ = sweep
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    res = ablation_report.report(folder, tmp_path / "r", use_wandb=True)
    run_dir = Path(res["wandb_dir"]).parent
    assert run_dir.name.startswith("offline-run-")
    media = run_dir / "files" / "media"
    assert len(list(media.rglob("*.table.json"))) == 2
    assert len(list(media.rglob("*.png"))) == 3
    logged = json.loads(next(media.rglob("ablation_table*.table.json")).read_text())
    assert [r[0] for r in logged["data"]] == ["gqa", "mla"]


def test_report_reads_hydra_config_before_any_checkpoint(sweep, tmp_path):
    folder, _ = sweep
    partial = tmp_path / "partial"
    for i in ("0", "1"):
        shutil.copytree(folder / i, partial / i, ignore=shutil.ignore_patterns("checkpoints"))
    raw = ablation_report.report(partial, tmp_path / "r")["rows"]
    full = json.loads(json.dumps(ablation_report.report(folder, tmp_path / "r2")["rows"]))
    assert [r["config_source"] for r in raw] == ["hydra", "hydra"]
    for a, b in zip(raw, full):
        for key in ("variant", "params", "kv_bytes_per_token", "kv_bytes_per_sequence", "final_val_loss"):
            assert a[key] == b[key], key
    assert "No checkpoint yet" in (tmp_path / "r" / "ablation.md").read_text()


def test_report_groups_seeds_into_arms(sweep, tmp_path):
    """--by: one row per arm, each seed's bits/byte side by side and the means. The sweep's two runs (gqa,
    mla) become two seeds of one arm: the mla run's copy is relabelled seed 1338."""
    folder, _ = sweep
    two = tmp_path / "two_seeds"
    for i, seed in (("0", 1337), ("1", 1338)):
        shutil.copytree(folder / i, two / i)
        cfg = two / i / "checkpoints" / "latest" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "seed": seed}))
    last = {seed: [r for r in metrics(two / i) if "val_loss" in r][-1] for i, seed in (("0", 1337), ("1", 1338))}
    res = ablation_report.report(two, tmp_path / "r", by=("data.source",))
    (arm,) = res["arms"]
    assert arm["arm"] == "data.source=text"
    assert arm["bpb_by_seed"] == {s: last[s]["val_bpb"] for s in last}
    assert arm["val_bpb"] == pytest.approx((last[1337]["val_bpb"] + last[1338]["val_bpb"]) / 2)
    assert arm["val_loss"] == pytest.approx((last[1337]["val_loss"] + last[1338]["val_loss"]) / 2)
    md = (tmp_path / "r" / "ablation.md").read_text()
    assert f"| data.source=text | {last[1337]['val_bpb']:.4f} | {last[1338]['val_bpb']:.4f} | " in md
    assert "seed" not in res["differences"]  # what repeats an arm is not a difference between arms
    with pytest.raises(ablation_report.ReportError, match="--by train.optimzer: no such key"):
        ablation_report.report(two, tmp_path / "r", by=("train.optimzer",))


def test_report_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.ablation_report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run folders") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("extra", [[], ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.kv_lora_rank=16",
                                        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
                                        "model.ffn_dim=${matched_ffn_dim:mha,64}"]])  # another size: its own reference
def test_matched_preset_equalises_parameters(extra):
    from omegaconf import OmegaConf

    from training.ablation import count_params

    counts, ffn = {}, {}
    for a in ("mha", "gqa", "mqa", "mla"):
        cfg = compose_config(["+experiment=attention_ablation_matched", f"attention={a}", *extra])
        m = OmegaConf.to_container(cfg.model, resolve=True)
        counts[a], ffn[a] = count_params(m), m["ffn_dim"]
        assert cfg.wandb.name == f"{a}-matched" and "matched_params" in cfg.wandb.tags
    assert ffn["mha"] == (64 if extra else 512)  # the reference keeps its width
    assert ffn["mqa"] > ffn["gqa"] > ffn["mha"]  # fewer K/V parameters -> a wider FFN
    dim, layers = m["dim"], m["n_layers"]
    assert dim == (32 if extra else 192)
    assert all(abs(counts[a] - counts["mha"]) <= 3 * dim * layers / 2 for a in counts), counts


def test_recipe_preset_is_exactly_the_make_train_defaults():
    """conf/experiment/recipe_ablation.yaml compares recipes under `make train`'s budget: without its sweep
    (no -m) it composes to the very config of `python train.py`, the wandb labels aside."""
    from omegaconf import OmegaConf

    plain, preset = (OmegaConf.to_container(compose_config(args)) for args in ([], ["+experiment=recipe_ablation"]))
    plain.pop("wandb"), preset.pop("wandb")
    assert preset == plain
