"""The attention ablation end to end: a tiny two-variant sweep through Hydra multirun (the preset, its
sweeper defaults overridden on the command line, wandb offline), then the report (tables, numbers,
plots, decode column, wandb logging), its statistics over seeds against numbers worked out by hand, the
serving measurement, and the matched-parameter and matched-KV presets."""

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
    """`python train.py -m +experiment=attention_ablation attention=gqa,mla seed=1337 <tiny>`: one subprocess, two
    runs (the command line's data=text and one seed replace the preset's data and seeds sweep)."""
    tmp = tmp_path_factory.mktemp("ablation")
    wandb_dir = tmp / "wandb_dir"
    wandb_dir.mkdir()
    tiny = [a for a in tiny_overrides(corpus, data_cache, tmp / "unused")
            if not a.startswith(("out_dir=", "wandb.mode="))]  # each run gets its own Hydra folder; wandb on
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "+experiment=attention_ablation",
                           "attention=gqa,mla", "seed=1337", *tiny, f"hydra.sweep.dir={tmp / 'sweep'}"],
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
        assert c["wandb"]["tags"] == ["attention_ablation", c["model"]["attention"], "text", "seed1337"]

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


def table(md: str, first_column: str = "variant", key: str = "variant") -> dict[str, dict[str, str]]:
    """The markdown table whose header starts with `first_column`, as {row[key]: {column: cell}}."""
    blocks, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip("|").split("|")])
        elif block:
            blocks.append(block)
            block = []
    head, _, *rows = next(b for b in blocks if b[0][0] == first_column)
    return {dict(zip(head, r))[key]: dict(zip(head, r)) for r in rows}


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
        assert row["seed"] == "1337" and row["data"] == "text" and row["recall acc"] == "—"
        assert row["decode tok/s @ batch 16"] == "—"
    raw = json.loads((out / "ablation.json").read_text())
    assert raw["config_differences"] == []
    assert [len(r["curve"]) for r in raw["runs"]] == [2, 2]
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "quality_vs_kv_bytes.png"):
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
    assert len(list(media.rglob("*.table.json"))) == 3  # runs, their raw values, the seed table
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
    assert f"| data.source=text | {arm['data']} | {last[1337]['val_bpb']:.4f} | {last[1338]['val_bpb']:.4f} | " in md
    assert "seed" not in res["differences"]  # what repeats an arm is not a difference between arms
    with pytest.raises(ablation_report.ReportError, match="--by train.optimzer: no such key"):
        ablation_report.report(two, tmp_path / "r", by=("train.optimzer",))


def test_report_by_a_key_tells_apart_runs_of_one_name_and_seed(sweep, tmp_path):
    """Two runs of one wandb.name and seed that differ in a key (train.fit_schedule, as a time-budget sweep
    makes): without --by that key the report refuses them (which counts would be arbitrary); with it each is
    its own arm and the seed table compares them."""
    folder, _ = sweep
    pair = tmp_path / "pair"
    for i, fit in (("0", False), ("1", True)):
        shutil.copytree(folder / i, pair / i)
        cfg = pair / i / "checkpoints" / "latest" / "config.json"
        c = json.loads(cfg.read_text())
        c.update(seed=1337, model={**c["model"], "attention": "gqa"}, train={**c["train"], "fit_schedule": fit},
                 wandb={**c["wandb"], "name": "same"})
        cfg.write_text(json.dumps(c))
    with pytest.raises(ablation_report.ReportError, match="two runs of same with seed 1337"):
        ablation_report.report(pair, tmp_path / "r")
    res = ablation_report.report(pair, tmp_path / "r", by=("train.fit_schedule",))
    assert sorted(a["arm"] for a in res["arms"]) == ["train.fit_schedule=False", "train.fit_schedule=True"]
    (summary,) = res["seeds"].values()
    assert sorted(v["variant"] for v in summary) == ["train.fit_schedule=False", "train.fit_schedule=True"]


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


def fake_rows(values: dict) -> list[dict]:
    """Report rows ({variant: {seed: val bits/byte}}) in the order the report sorts them."""
    return [{"variant": v, "seed": s, "final_val_bpb": bpb, "run_dir": f"{v}/{s}"}
            for v, by_seed in values.items() for s, bpb in by_seed.items()]


def test_seed_statistics_against_numbers_worked_by_hand():
    from scripts.ablation_stats import seed_summary, verdict

    def near(x):  # the hand-worked figures have 5 or 6 digits
        return pytest.approx(x, rel=2e-5, abs=1e-6)

    rows = fake_rows({"mha": {1: 2.00, 2: 2.10, 3: 2.06}, "gqa": {1: 2.03, 2: 2.12, 3: 2.11},
                      "mla": {1: 2.10, 2: 2.21, 3: 2.17}, "mqa": {1: 1.98, 2: 2.15}, "one": {2: 2.2}})
    rows.append({"variant": "mqa", "seed": 3, "final_val_bpb": None, "run_dir": "not evaluated yet"})
    s = {e["variant"]: e for e in seed_summary(rows, "final_val_bpb")}
    assert [e for e in s] == ["mha", "gqa", "mla", "mqa", "one"] and s["mha"]["diff"] is None
    # mha: mean 6.16 / 3; deviations -0.05333, 0.04667, 0.00667: variance 0.0050667 / 2, std 0.050332
    assert (s["mha"]["n"], s["mha"]["mean"], s["mha"]["std"]) == (3, near(2.053333), near(0.050332))
    # gqa - mha per seed: 0.03, 0.02, 0.05: mean 0.033333, std 0.015275; t(2 dof) = 4.303: half-width
    # 4.303 x 0.015275 / sqrt(3) = 0.037949, so the interval -0.004616 .. 0.071282 holds zero
    d = s["gqa"]["diff"]
    assert d["diffs"] == near([0.03, 0.02, 0.05]) and d["seeds"] == [1, 2, 3]
    assert (d["mean"], d["std"]) == (near(0.033333), near(0.015275))
    assert (d["low"], d["high"], d["exceeds"]) == (near(-0.004616), near(0.071282), False)
    # mla - mha: 0.10, 0.11, 0.11: mean 0.106667, std 0.0057735, half-width 0.014343: 0.092323 .. 0.121010
    d = s["mla"]["diff"]
    assert (d["mean"], d["std"], d["low"], d["high"], d["exceeds"]) == (
        near(0.106667), near(0.0057735), near(0.092323), near(0.121010), True)
    # mqa has seeds 1 and 2 only: -0.02, 0.05: mean 0.015, std 0.049497, t(1 dof) = 12.706: -0.42971 .. 0.45971
    d = s["mqa"]["diff"]
    assert (d["seeds"], d["mean"], d["std"]) == ([1, 2], near(0.015), near(0.049497))
    assert (d["low"], d["high"], d["exceeds"]) == (near(-0.42971), near(0.45971), False)
    assert s["one"]["std"] is None and s["one"]["diff"]["exceeds"] is None  # one seed: no spread
    assert verdict(s["mla"], "bits/byte") == ("mla - mha: +0.1067 bits/byte (+- 0.0058 over 3 seeds, 95% interval "
                                              "+0.0923 to +0.1210): exceeds the seed-to-seed spread")
    assert verdict(s["gqa"], "bits/byte").endswith("within the seed-to-seed spread, the seeds do not show a difference")
    assert verdict(s["one"], "bits/byte") == ("one - mha: +0.1000 bits/byte (one seed): no spread to compare with, "
                                              "run more seeds")


def seeded_copies(sweep: Path, dest: Path, bpb: dict) -> Path:
    """The sweep's gqa (0) and mla (1) runs copied as seeds 1337 and 1338 each, their last val bits/byte set to
    bpb[variant][seed]."""
    for i, variant in (("0", "gqa"), ("1", "mla")):
        for seed, value in bpb[variant].items():
            run = dest / f"{variant}-{seed}"
            shutil.copytree(sweep / i, run)
            cfg = run / "checkpoints" / "latest" / "config.json"
            cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "seed": seed}))
            records = metrics(run)
            last = max(j for j, r in enumerate(records) if "val_loss" in r)
            records[last]["val_bpb"] = value
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dest


def test_report_gives_each_variant_its_seeds_spread_and_paired_difference(sweep, tmp_path):
    folder, _ = sweep
    seeds = seeded_copies(folder, tmp_path / "seeds", {"gqa": {1337: 2.0, 1338: 2.1}, "mla": {1337: 2.05, 1338: 2.2}})
    ablation_report.report(seeds, tmp_path / "r")
    md = (tmp_path / "r" / "ablation.md").read_text()
    rows = table(md, first_column="data")
    # gqa: 2.0, 2.1: mean 2.05, std 0.0707107. mla - gqa: 0.05, 0.10: mean 0.075, std 0.0353553; t(1 dof) 12.706:
    # half-width 12.706 x 0.0353553 / sqrt(2) = 0.31765
    assert rows["gqa"]["val bits/byte (mean ± std)"] == "2.0500 ± 0.0707" and rows["gqa"]["seeds"] == "2"
    assert rows["mla"]["val bits/byte (mean ± std)"] == "2.1250 ± 0.1061"
    assert rows["mla"]["Δ vs gqa (mean ± std)"] == "+0.0750 ± 0.0354"
    assert rows["mla"]["95% interval of Δ"] == "-0.2427 to +0.3927" and rows["mla"]["exceeds seed spread"] == "no"
    assert "- mla - gqa: +0.0750 bits/byte (+- 0.0354 over 2 seeds" in md
    assert len(table(md, key="seed")) == 2 and "Not a like-for-like" not in md  # the seed is no difference


def test_report_refuses_two_runs_of_one_variant_and_seed(sweep, tmp_path):
    folder, _ = sweep
    twice = tmp_path / "twice"
    for copy in ("a", "b"):
        shutil.copytree(folder / "0", twice / copy)
    with pytest.raises(ablation_report.ReportError, match="two runs of gqa with seed 1337"):
        ablation_report.report(twice, tmp_path / "r")


@pytest.mark.parametrize("size, rank", [([], 112), (["model=gpt2"], 480)])
def test_matched_kv_preset_equalises_kv_bytes_per_token(size, rank):
    """tiny: GQA caches 2 x 2 kv heads x 32 = 128 values per layer, MLA 112 + 16 rope; gpt2: 2 x 4 x 64 = 512,
    MLA 480 + 32."""
    from omegaconf import OmegaConf

    from model import ModelConfig

    m = {a: OmegaConf.to_container(compose_config(["+experiment=attention_ablation_matched_kv", f"attention={a}",
                                                   *size]).model, resolve=True) for a in ("gqa", "mla")}
    assert kv_bytes_by_hand(m["gqa"]) == kv_bytes_by_hand(m["mla"])
    assert m["mla"]["kv_lora_rank"] == rank and m["gqa"]["n_kv_heads"] == (4 if size else 2)
    assert ModelConfig(**m["gqa"]).kv_cache_bytes_per_token() == ModelConfig(**m["mla"]).kv_cache_bytes_per_token()


@pytest.mark.filterwarnings("ignore:the C\\+\\+ decode step does not apply")  # MLA: the PyTorch step, as meant
@pytest.mark.parametrize("attention, fp32_bytes_per_token", [("gqa", 2 * 2 * 2 * 16 * 4), ("mla", 2 * (32 + 8) * 4)])
def test_serving_batch_fits_the_kv_budget_and_one_more_does_not(attention, fp32_bytes_per_token, tmp_path):
    """tests/builders.tiny_config: 2 layers, GQA 2 kv heads of 16, MLA latent 32 + rope 8. Sequences of 8 + 24
    tokens take 2 blocks of 16; a budget of 7 blocks holds 3 of them, and the engine must preempt for a 4th."""
    from builders import write_checkpoint
    from engine import LLM
    from scripts.ablation_serving import decode_batch, serving_row

    run = write_checkpoint(tmp_path / attention, attention)
    budget = 7 * 16 * fp32_bytes_per_token + 100
    row = serving_row(run, budget, prompt_tokens=8, new_tokens=24)
    assert (row["num_blocks"], row["batch"], row["kv_bytes_per_token"]) == (7, 3, fp32_bytes_per_token)
    assert row["preemptions"] == 0 and row["blocks_used_peak"] <= 7 and row["decode_tokens_per_s"] > 0
    llm = LLM(run, device="cpu", num_blocks=7, max_num_seqs=4, enable_prefix_caching=False)
    assert decode_batch(llm, 4, 8, 24).preemptions > 0
