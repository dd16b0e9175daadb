"""Export to Hugging Face: transformers loads the folder with no custom code and computes what we compute.

The reference is transformers itself (LlamaForCausalLM, DeepseekV3ForCausalLM): logits within 1e-5 in
fp32, identical greedy continuations against our paged engine, identical token ids from AutoTokenizer.
"""

import errno
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from builders import write_checkpoint
from checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_pretrained
from checkpoint.hf import write_hf_folder
from engine import LLM, SamplingParams
import export
from export import main as export_main

# attention kind and ModelConfig overrides; MLA with the latent eps transformers' DeepSeek code fixes.
VARIANTS = {"mha": ("mha", {}), "gqa": ("gqa", {}), "mqa": ("mqa", {}),
            "mla": ("mla", {"latent_norm_eps": 1e-6}),
            "gqa_tied_theta": ("gqa", {"tie_embeddings": True, "rope_theta": 500000.0}),
            "mla_qlora_tied": ("mla", {"latent_norm_eps": 1e-6, "q_lora_rank": 24, "tie_embeddings": True})}
MIXED = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n\n"
         "  naïve café — 東京 🚀 \t tabs\tand   runs of    spaces\r\n<|endoftext|>ROMEO: end")


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """(our run folder, the exported HF folder) for one variant, exported through the CLI."""
    attention, overrides = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    run = write_checkpoint(root / "run", attention, seed=3, **overrides)
    assert export_main(["--ckpt", str(run), "--format", "hf", "--out", str(root / "hf")]) == 0
    return run, root / "hf"


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


MLA_ONLY = {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "latent_norm_eps"}


def meaningful(cfg) -> dict:
    """The config fields the model uses (MLA's widths mean nothing to MHA/GQA/MQA and are not exported)."""
    return {k: v for k, v in cfg.to_dict().items() if cfg.attention == "mla" or k not in MLA_ONLY}


def test_round_trip_is_bitwise(exported):
    run, hf = exported
    a, b = load_pretrained(run), load_pretrained(hf)
    assert meaningful(b.config) == meaningful(a.config)
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert b.eos_id == a.eos_id


def test_logits_match_transformers(exported):
    run, hf = exported
    model = hf_model(hf)
    expected = {"mla": "DeepseekV3ForCausalLM"}.get(load_pretrained(run).config.attention, "LlamaForCausalLM")
    assert type(model).__name__ == expected
    llm = LLM(run, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for length in (1, 17, 64):
        ids = torch.randint(0, llm.cfg.vocab_size, (3, length), generator=gen)
        with torch.no_grad():
            ours, _ = llm.model(ids)
            theirs = model(ids).logits
        assert (ours - theirs).abs().max().item() < 1e-5


def assert_greedy_equal(llm: LLM, model, prompts: list[list[int]], n: int = 32) -> None:
    """n greedy tokens from our paged engine == transformers' generate, EOS ignored by both."""
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
    gc = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        theirs = model.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))[0, len(prompt):]
        assert out.token_ids == theirs.tolist()
        # Untied random models give varied text (a meaningful comparison); tied ones tend to echo a token.
        assert llm.cfg.tie_embeddings or len(set(out.token_ids)) > 3


def test_greedy_engine_equals_transformers_generate(exported):
    run, hf = exported
    llm = LLM(run, device="cpu", dtype=torch.float32)
    prompts = [llm.tokenizer.encode(t).ids for t in ("ROMEO: But soft", "To be, or not", "The quick brown fox")]
    assert_greedy_equal(llm, hf_model(hf), prompts)


def test_auto_tokenizer_matches_ours(exported):
    run, hf = exported
    ours = LLM(run, device="cpu", dtype=torch.float32).tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = ours.encode(MIXED).ids
    assert tok(MIXED)["input_ids"] == ids
    assert tok.decode(ids) == MIXED
    assert tok.eos_token == "<|endoftext|>"


def test_folder_contents(exported):
    run, hf = exported
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    cfg = load_pretrained(run).config
    hf_cfg = json.loads((hf / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] == cfg.tie_embeddings and hf_cfg["rope_theta"] == cfg.rope_theta
    assert hf_cfg["max_position_embeddings"] == cfg.max_seq_len and hf_cfg["rms_norm_eps"] == cfg.norm_eps
    assert ("lm_head.weight" in load_file(hf / "model.safetensors")) != cfg.tie_embeddings


def test_sharded_folder_loads(tmp_path):
    """Above max_shard_bytes the weights are split with an index; transformers and we read them back."""
    run = write_checkpoint(tmp_path / "run", "gqa")
    p = load_pretrained(run)
    write_hf_folder(tmp_path / "hf", p.config, p.state_dict, p.tokenizer_path, p.eos_id, max_shard_bytes=40_000)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = load_pretrained(tmp_path / "hf")
    assert all(torch.equal(p.state_dict[k], back.state_dict[k]) for k in p.state_dict)
    ids = torch.randint(0, p.config.vocab_size, (2, 20))
    with torch.no_grad():
        ours, _ = LLM(run, device="cpu", dtype=torch.float32).model(ids)
        assert (ours - hf_model(tmp_path / "hf")(ids).logits).abs().max().item() < 1e-5


def test_bfloat16_export(tmp_path):
    run = write_checkpoint(tmp_path / "run", "gqa")
    assert export_main(["--ckpt", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "hf" / "model.safetensors").values())
    p, back = load_pretrained(run), load_pretrained(tmp_path / "hf")
    assert all(torch.equal(p.state_dict[k].bfloat16(), back.state_dict[k]) for k in p.state_dict)


def test_mla_with_another_latent_eps_is_refused(tmp_path, capsys):
    """transformers fixes the latent eps at 1e-6: an MLA model normalising with 1e-5 would not export exactly."""
    run = write_checkpoint(tmp_path / "run", "mla")  # latent_norm_eps None -> norm_eps 1e-5
    assert export_main(["--ckpt", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "latent_norm_eps=1e-06" in err
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.fixture
def one_run(tmp_path):
    return write_checkpoint(tmp_path / "run", "gqa")


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "invalid choice: 'onnx'"),
    (["--format", "gguf", "--outtype", "q4_k"], "invalid choice: 'q4_k'"),
    (["--format", "hf", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--format", "hf", "--ckpt", "/nonexistent/run"], "no checkpoint at '/nonexistent/run'"),
])
def test_bad_arguments_give_one_line(one_run, tmp_path, capsys, args, message):
    argv = ["--ckpt", str(one_run), "--out", str(tmp_path / "out")] + args  # later flags win
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_gives_one_line(one_run, tmp_path, capsys):
    (one_run / "checkpoints" / "latest" / "model.safetensors").write_bytes(b"\0" * 64)
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "corrupt" in err and err.count("\n") == 1


@pytest.mark.parametrize("fmt, name", [("hf", "out"), ("gguf", "out.gguf")])
def test_existing_output_is_kept_unless_force(one_run, tmp_path, capsys, fmt, name):
    out = tmp_path / name
    if fmt == "hf":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    assert export_main(["--ckpt", str(one_run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert (out / "mine.txt" if fmt == "hf" else out).read_text() == "keep me"
    assert export_main(["--ckpt", str(one_run), "--format", fmt, "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() if fmt == "hf" else out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", name])  # no temporary left


def test_empty_existing_folder_is_filled(one_run, tmp_path):
    (tmp_path / "out").mkdir()
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_model_card_has_config_data_and_final_validation(tmp_path):
    run = write_checkpoint(tmp_path / "run", "gqa")
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "train_loss": 5.0}\n{"step": 1, "val_loss": 4.25, "val_bpb": 1.5}\n'
        '{"step": 2, "val_loss": 3.0, "val_bpb": 1.0}\n')  # after the checkpoint (step 1): not its figure
    cfg_file = run / "checkpoints" / "latest" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["data"] = {"source": "text", "path": "notes/"}
    cfg_file.write_text(json.dumps(cfg))
    assert export_main(["--ckpt", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "loss 4.2500, bits per byte 1.5000" in card and '"path": "notes/"' in card and '"n_kv_heads": 2' in card


def tree(folder) -> dict:
    """Every path under `folder` with its bytes (files) or target (links): what must survive untouched."""
    return {p: os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("ckpt, fmt, out", [
    ("run", "hf", "run"),  # equal to the run
    ("run", "gguf", "run/checkpoints"),  # inside it
    ("run/checkpoints/latest", "hf", "run"),  # the run around the checkpoint
    ("run/checkpoints/latest", "gguf", "run/checkpoints/step_0000001/tokenizer.json"),
    ("run", "hf", "."),  # above it
])
def test_out_overlapping_the_source_is_refused_even_with_force(one_run, tmp_path, capsys, ckpt, fmt, out):
    """--force used to replace the run it read (issue 25): every overlap is refused, and the run is untouched."""
    (one_run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree(one_run)
    argv = ["--ckpt", str(tmp_path / ckpt), "--format", fmt, "--out", str(tmp_path / out), "--force"]
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "would destroy the source" in err, err
    assert tree(one_run) == before
    assert not [p for p in tmp_path.rglob(".tmp*")]


def test_missing_parent_folders_of_out_are_created(one_run, tmp_path, capsys):
    out = tmp_path / "exports" / "deep" / "a-hf"
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    (tmp_path / "a-file").write_text("")  # a parent that cannot be a folder: one line naming it
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(tmp_path / "a-file" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"cannot create the folder {tmp_path / 'a-file'}" in err


def test_a_failed_forced_export_keeps_the_old_output(one_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(out)]) == 0
    before = tree(out)
    real = export.write_hf_folder

    def disk_full(folder, *args, **kw):
        real(folder, *args, **kw)  # the new export is written whole, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "write_hf_folder", disk_full)
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(out), "--force"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_checkpoint_errors_name_their_cause_and_show_the_traceback_when_asked(one_run, tmp_path, capsys,
                                                                             monkeypatch):
    """Not every failure is corruption (issue 25): a file the OS cannot read says so, a corrupt one says what
    its reader found, the cause stays attached, and SMALL_LLM_DEBUG=1 prints its traceback."""
    latest = (one_run / "checkpoints" / "latest").resolve()
    weights = latest / "model.safetensors"
    weights.unlink()
    weights.symlink_to("/proc/self/mem")  # a regular file that cannot be mapped: ENODEV, an OS error
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(one_run)
    assert "cannot read model.safetensors (No such device" in str(e.value) and "corrupt" not in str(e.value)
    assert isinstance(e.value.__cause__, OSError)

    (latest / "trainer_state.pt").write_bytes(b"not a torch file")
    try:
        torch.load(latest / "trainer_state.pt", weights_only=True)
    except Exception as reference:  # what torch itself says about the file
        cause = f"{type(reference).__name__}: {str(reference).splitlines()[0][:100]}"
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupt") as e:
        Checkpoint(latest, {}, {}, latest / "tokenizer.json").trainer_state()
    assert cause in str(e.value) and "\n" not in str(e.value)

    weights.unlink()
    weights.write_bytes(b"\0" * 64)
    monkeypatch.setenv("SMALL_LLM_DEBUG", "1")
    assert export_main(["--ckpt", str(one_run), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and "SafetensorError" in "\n".join(err)
    assert err[-1].startswith("error: ") and "model.safetensors is corrupt" in err[-1]
