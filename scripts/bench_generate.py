"""Benchmark the engine: decode and prefill tokens/s, and KV memory utilisation on a mixed workload.

    python scripts/bench_generate.py                           # GQA, batch 1/16/64, CPU, eager
    python scripts/bench_generate.py --compile --hf            # compiled decode step; HF measured alongside
    python scripts/bench_generate.py --no-cpp-decode           # the eager PyTorch step, not the C++ one
    python scripts/bench_generate.py --llama-cpp                 # llama.cpp on the same weights (GGUF f32, q8_0)
    python scripts/bench_generate.py --attention mha mqa mla     # other variants
    python scripts/bench_generate.py --no-paged-kernel           # decode through the PyTorch gather path
    python scripts/bench_generate.py --quantize int8 --llama-cpp # int8 weights against llama.cpp's q8_0
    python scripts/bench_generate.py --busy                      # next to a process spinning on one core
    python scripts/bench_generate.py --busy --fixed-threads      # ... without the thread governor
    python scripts/bench_generate.py --busy --llama-cpp --batch 1 --no-mixed  # ... llama.cpp beside us
    python scripts/bench_generate.py --json

Model: d=256, 6 layers, 8 heads (2 kv heads for GQA), SwiGLU 688, vocab 8192, fp32, random weights.
Workload: 32-token random prompts, 128 new tokens each, EOS ignored. Every comparison is measured in
the same run, next to ours (the machine is shared, so figures taken at different times differ):
--hf runs Hugging Face transformers' generate on the same shape; --llama-cpp exports the same weights
to GGUF (f32 and q8_0, checkpoint/gguf.py) and times llama.cpp's decode at batch 1, alternating with
ours repeat by repeat.

decode tok/s  = tokens produced by decode steps / time in decode steps (scheduling and sampling included)
e2e tok/s     = all new tokens / wall time of generate() (prefill included)
prefill tok/s = prompt tokens / time in prefill steps

Mixed workload: requests with prompts of 8-512 tokens and 16-512 new tokens arriving together with a
KV budget that forces continuous batching; reports the KV memory held by live tokens over the memory
of the blocks allocated to them, averaged over steps (target >= 96%).
"""

import argparse
import json
import multiprocessing
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from scripts.busy import spin_one_core  # noqa: E402

def bench_model(attention: str, max_seq_len: int = 256) -> Transformer:
    kv = {"mha": 8, "gqa": 2, "mqa": 1, "mla": 8}[attention]
    cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=kv, ffn_dim=688,
                      max_seq_len=max_seq_len, attention=attention)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def run_batch(llm: LLM, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, llm.cfg.vocab_size) for _ in range(prompt_len)] for _ in range(batch)]
    sp = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    s = llm.stats
    return {"batch": batch, "decode_tok_s": round(s.decode_tokens_per_s, 1),
            "e2e_tok_s": round(batch * new_tokens / wall, 1),
            "prefill_tok_s": round(s.prefill_tokens_per_s, 1), "wall_s": round(wall, 3)}


def hf_baseline(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Hugging Face transformers' generate on the same shape (a Llama with 2 kv heads), greedy, EOS off:
    measured next to ours on the same machine at the same time (the CPU here is shared and noisy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 8192, (batch, prompt_len))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    best = 0.0
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            assert out.shape[1] == prompt_len + new_tokens
            best = max(best, batch * new_tokens / (time.perf_counter() - t0))
    return {"batch": batch, "hf_e2e_tok_s": round(best, 1)}


def llama_cpp_decode(llama, prompt: list[int], new_tokens: int) -> float:
    """llama.cpp's greedy decode tokens/s after the prompt: the time from the first new token to the last."""
    stamps = []
    for _ in llama.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def llama_cpp_vs_ours(llm: LLM, model: Transformer, att: str, args) -> dict:
    """Batch-1 decode tokens/s of llama.cpp (GGUF f32 and q8_0 of the same weights; f32 also on the thread
    count llama-cpp-python picks by itself, if that differs) and ours, alternating."""
    import tempfile

    from checkpoint import CheckpointError
    from checkpoint.gguf import load_in_llama_cpp, write_gguf
    from data.tokenizer import train_tokenizer

    row = {"attention": att, "batch": 1, "llama_cpp_threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"  # GGUF carries a tokenizer; prompts here are ids, so any will do
        train_tokenizer(["small-llm benchmarks llama.cpp on the same weights."] * 8, 300).save(str(tok))
        state = {k: v.float() for k, v in model.state_dict().items()}  # fp32 even when ours runs int8
        models = {}
        for outtype in ("f32", "q8_0"):
            path = Path(tmp) / f"{outtype}.gguf"
            try:
                write_gguf(path, llm.cfg, state, tok, None, outtype)
            except CheckpointError as e:
                return {**row, "llama_cpp": f"not exportable: {e}"}
            models[outtype] = load_in_llama_cpp(path, args.prompt_len + args.new_tokens, n_threads=args.threads)
        own = max(multiprocessing.cpu_count() // 2, 1)  # llama-cpp-python's default n_threads: what its users get
        if own != args.threads:
            models[f"f32_{own}_threads"] = load_in_llama_cpp(Path(tmp) / "f32.gguf", args.prompt_len + args.new_tokens)
        prompt = [random.Random(0).randrange(1, llm.cfg.vocab_size) for _ in range(args.prompt_len)]
        best = dict.fromkeys(["ours", *models], 0.0)
        for r in range(args.repeats):
            best["ours"] = max(best["ours"], run_batch(llm, 1, args.prompt_len, args.new_tokens, seed=r)["decode_tok_s"])
            for outtype, model in models.items():
                best[outtype] = max(best[outtype], llama_cpp_decode(model, prompt, args.new_tokens))
        for model in models.values():
            model.close()
    row["decode_tok_s"] = best.pop("ours")
    for outtype, tps in best.items():
        row[f"llama_cpp_{outtype}_decode_tok_s"] = round(tps, 1)
        row[f"x_llama_cpp_{outtype}"] = round(row["decode_tok_s"] / tps, 2)
    return row


def mixed_workload(attention: str, block_size: int, paged_kernel: bool, seed: int = 0) -> dict:
    model = bench_model(attention, max_seq_len=1024)
    rng = random.Random(seed)
    n = 48
    prompts = [[rng.randrange(1, 8192) for _ in range(rng.randint(8, 512))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_new_tokens=rng.randint(16, 512), ignore_eos=True) for _ in range(n)]
    # 6144 tokens of KV for 48 requests of up to 1024 tokens: continuous batching with preemptions.
    llm = LLM(model=model, device="cpu", block_size=block_size, num_blocks=6144 // block_size,
              max_num_seqs=16, enable_prefix_caching=False, paged_kernel=paged_kernel)
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    s = llm.stats
    return {"requests": n, "block_size": block_size, "kv_memory_utilization": round(s.kv_memory_utilization, 4),
            "blocks_used_peak": s.blocks_used_peak, "num_blocks": s.num_blocks, "preemptions": s.preemptions,
            "decode_tok_s": round(s.decode_tokens_per_s, 1), "wall_s": round(time.perf_counter() - t0, 2)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attention", nargs="+", default=["gqa"], choices=["mha", "gqa", "mqa", "mla"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (about a minute first)")
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed-length memory workload")
    ap.add_argument("--no-paged-kernel", action="store_true",
                    help="decode through the PyTorch gather path instead of the C++ paged-attention kernel")
    ap.add_argument("--no-cpp-decode", action="store_true",
                    help="decode through the PyTorch step instead of the C++ one (LLM(cpp_decode=False))")
    ap.add_argument("--hf", action="store_true", help="also measure Hugging Face transformers' generate here")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also measure llama.cpp (llama-cpp-python) at batch 1 on the same weights, f32 and q8_0")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="our engine with int8 weights (engine/quantize.py)")
    ap.add_argument("--busy", action="store_true",
                    help="run everything next to a process spinning on one core (a busy machine)")
    ap.add_argument("--fixed-threads", action="store_true",
                    help="keep torch's thread count fixed (LLM(adaptive_threads=False)): what --busy costs without it")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.busy:
        spin_one_core()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # llama.cpp's: torch's own count, before the governor moves it
    results = {"threads": torch.get_num_threads(), "compile": args.compile, "cpp_decode": not args.no_cpp_decode,
               "quantize": args.quantize, "busy": args.busy,
               "adaptive_threads": not args.fixed_threads,
               "paged_kernel": not args.no_paged_kernel, "runs": []}
    for att in args.attention:
        model = bench_model(att)
        llm = LLM(model=model, device="cpu", block_size=args.block_size, enable_prefix_caching=False,
                  max_num_seqs=max(args.batch), compile=args.compile, paged_kernel=not args.no_paged_kernel,
                  quantize=args.quantize, adaptive_threads=not args.fixed_threads, cpp_decode=not args.no_cpp_decode)
        t0 = time.perf_counter()
        run_batch(llm, 2, args.prompt_len, 8, seed=123)  # warm-up (and compilation: batch >= 2 ...)
        run_batch(llm, 1, args.prompt_len, 4, seed=124)  # ... and batch 1)
        if not args.json:
            print(json.dumps({"attention": att, "warmup_s": round(time.perf_counter() - t0, 1)}), flush=True)
        for b in args.batch:
            best = max((run_batch(llm, b, args.prompt_len, args.new_tokens, seed=r) for r in range(args.repeats)),
                       key=lambda r: r["decode_tok_s"])
            best["attention"] = att
            if args.hf and att == "gqa":
                hf = hf_baseline(b, args.prompt_len, args.new_tokens, args.repeats)
                best["hf_e2e_tok_s_measured"] = hf["hf_e2e_tok_s"]
                best["x_hf_measured_e2e"] = round(best["e2e_tok_s"] / hf["hf_e2e_tok_s"], 2)
            results["runs"].append(best)
            if not args.json:
                print(json.dumps(best), flush=True)
        if args.llama_cpp:
            row = llama_cpp_vs_ours(llm, model, att, args)
            results.setdefault("llama_cpp", []).append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
        if not args.no_mixed:
            mixed = mixed_workload(att, args.block_size, not args.no_paged_kernel)
            mixed["attention"] = att
            results.setdefault("mixed", []).append(mixed)
            if not args.json:
                print(json.dumps({"mixed": mixed}), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
