"""Import from Hugging Face: folders that transformers itself wrote (save_pretrained) run here as they run there.

The reference is transformers on the same folder: logits within 1e-5 in fp32 and identical greedy
continuations. What we cannot run faithfully is refused with one line naming the field.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from builders import train_tiny_tokenizer
from checkpoint import CheckpointError, load_pretrained
from checkpoint.hf import write_hf_folder
from engine import LLM
from export import main as export_main
from test_export_hf import assert_greedy_equal

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def save_random(folder, kind: str, tokenizer: bool = True, seed: int = 0):
    """A random model built and saved by transformers: an untied GQA Llama with theta 500000 and llama3
    rope scaling (the Llama 3 layout), the same tied (Llama 3.2 1B, SmolLM2), or a DeepSeek-V3 with MLA
    and every layer dense."""
    tok = train_tiny_tokenizer()
    vocab = tok.get_vocab_size()
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=kind == "llama_tied", bos_token_id=0, eos_token_id=0)
    if kind.startswith("llama"):
        cfg = transformers.LlamaConfig(num_key_value_heads=2, rope_parameters=dict(LLAMA3), **common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.DeepseekV3Config(kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                            v_head_dim=16, first_k_dense_replace=2, rms_norm_eps=1e-5, **common)
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # sharpen the logits, so greedy decoding has clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    if tokenizer:
        tok.save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module", params=["llama", "llama_tied", "deepseek"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return save_random(folder, request.param), folder


def test_logits_and_greedy_match_transformers(saved):
    model, folder = saved
    llm = LLM(folder, device="cpu", dtype=torch.float32)
    if isinstance(model, transformers.LlamaForCausalLM):
        assert llm.cfg.attention == "gqa" and llm.cfg.rope_theta == 500000.0 and llm.cfg.rope_scaling_factor == 8.0
        assert llm.cfg.tie_embeddings == model.config.tie_word_embeddings
    else:
        assert llm.cfg.attention == "mla"
    gen = torch.Generator().manual_seed(1)
    for length in (5, 100, 256):  # past original_max_position_embeddings: the llama3 bands all matter
        ids = torch.randint(0, llm.cfg.vocab_size, (2, length), generator=gen)
        with torch.no_grad():
            diff = (llm.model(ids)[0] - model(ids).logits).abs().max().item()
        assert diff < 1e-5
    assert_greedy_equal(llm, model, [[5, 60, 7, 200], list(range(40, 72))])


def test_hf_to_ours_to_hf_gives_the_same_tensors(saved, tmp_path):
    _, folder = saved
    p = load_pretrained(folder)
    write_hf_folder(tmp_path / "again", p.config, p.state_dict, p.tokenizer_path, p.eos_id)
    a, b = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_cli_runs_a_hf_folder(saved):
    _, folder = saved
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(folder), "--prompt", "To be",
                        "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_missing_tokenizer_is_named_and_can_be_given(tmp_path, capsys):
    save_random(tmp_path / "hf", "llama", tokenizer=False)
    with pytest.raises(CheckpointError, match="--tokenizer"):
        load_pretrained(tmp_path / "hf")
    train_tiny_tokenizer().save(str(tmp_path / "tok.json"))
    assert load_pretrained(tmp_path / "hf", tokenizer=tmp_path / "tok.json").tokenizer_path == tmp_path / "tok.json"
    capsys.readouterr()  # drop transformers' progress bars
    assert export_main(["--ckpt", str(tmp_path / "hf"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no tokenizer") and err.count("\n") == 1
    assert export_main(["--ckpt", str(tmp_path / "hf"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                        "--tokenizer", str(tmp_path / "tok.json")]) == 0


@pytest.mark.parametrize("kind, change, named", [
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"sliding_window": 4096}, "sliding_window=4096"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "type yarn"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act=gelu"),
    ("llama", {"head_dim": 32}, "head_dim=32"),
    ("deepseek", {"first_k_dense_replace": 1}, "MoE layers"),
])
def test_unsupported_fields_are_refused_in_one_line(tmp_path, capsys, kind, change, named):
    save_random(tmp_path / "hf", kind)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(")):
        load_pretrained(tmp_path / "hf")
    capsys.readouterr()  # drop transformers' progress bars
    assert export_main(["--ckpt", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_corrupt_or_incomplete_folder_is_refused(tmp_path, capsys):
    save_random(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(tmp_path / "hf")
