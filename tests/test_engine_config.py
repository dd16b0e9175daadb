"""EngineConfig (engine/config.py) is the one source of generate.py's and serve.py's engine flags: each
field is a flag of both command lines (or deliberately left out, below), a flag's value reaches the LLM
the command line builds, and bad values give one-line errors naming the flag."""

import importlib
import subprocess
import sys
from dataclasses import fields

import pytest
from test_generate_cli import ENV, ROOT, option_helps

from engine.config import EngineConfig

# Fields a command line deliberately has no flag for, and why.
EXCLUDED = {"generate.py": set(),
            "serve.py": {"use_cache"}}  # the online engine runs on the KV cache: full recompute is the offline reference

# A value other than the default for each field, as typed on the command line and as the config holds it
# (each parsed after --device cpu, so that --compile and --quantize int8 are valid on a machine with CUDA).
VALUES = {"device": (["--device", "cpu"], "cpu"), "dtype": (["--dtype", "bfloat16"], "bfloat16"),
          "block_size": (["--block-size", "8"], 8), "num_blocks": (["--num-blocks", "20"], 20),
          "kv_cache_memory": (["--kv-cache-memory", "100000"], 100000), "max_num_seqs": (["--max-num-seqs", "3"], 3),
          "max_num_batched_tokens": (["--max-num-batched-tokens", "512"], 512),
          "enable_prefix_caching": (["--no-prefix-caching"], False), "use_cache": (["--no-cache"], False),
          "compile": (["--compile"], True), "paged_kernel": (["--no-paged-kernel"], False),
          "quantize": (["--quantize", "int8"], "int8"), "adaptive_threads": (["--no-adaptive-threads"], False),
          "cpp_decode": (["--no-cpp-decode"], False)}


def parse(script: str, argv: list[str]):
    module = importlib.import_module(script.removesuffix(".py"))
    return module.parse_args(["--ckpt", "x", "--device", "cpu", *argv])


@pytest.mark.parametrize("script", ["generate.py", "serve.py"])
def test_every_field_is_a_flag(script):
    """--help lists a flag for every EngineConfig field not excluded above (the flags of VALUES), and the
    flags that were there before EngineConfig keep their names: README.md's "the same flags"."""
    assert set(VALUES) == {f.name for f in fields(EngineConfig)}, "give a new field a value in VALUES"
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)
    helps = option_helps(done.stdout)
    flags = {name: argv[0] for name, (argv, _) in VALUES.items()}
    missing = [flags[name] for name in VALUES if name not in EXCLUDED[script] and flags[name] not in helps]
    assert not missing, f"{script} --help lacks {missing}"
    assert all(flags[name] not in helps for name in EXCLUDED[script])
    before = {"--device", "--block-size", "--num-blocks", "--compile", "--quantize"}
    before |= {"--no-cache"} if script == "generate.py" else {"--max-num-seqs"}
    assert before <= set(helps)


@pytest.mark.parametrize("script", ["generate.py", "serve.py"])
def test_each_flag_sets_its_field(script):
    from generate import engine_config

    default = EngineConfig(device="cpu")
    for name, (argv, value) in VALUES.items():
        if name in EXCLUDED[script]:
            continue
        config = engine_config(parse(script, argv))
        assert getattr(config, name) == value, (script, name)
        others = {f.name for f in fields(config)} - {name}
        assert all(getattr(config, n) == getattr(default, n) for n in others), (script, name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from builders import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("cfg") / "run", "gqa", max_seq_len=64)


def test_flag_values_reach_the_engine(run_dir):
    """generate.py's and serve.py's LLM have the block size, budget and batch limits their flags name."""
    import generate
    import serve

    argv = ["--ckpt", str(run_dir), "--device", "cpu", "--block-size", "8", "--num-blocks", "20",
            "--max-num-seqs", "3", "--max-num-batched-tokens", "100", "--no-prefix-caching"]
    args = generate.parse_args(argv)
    gen, _ = generate.load_llm(args, generate.check_args(args))
    args = serve.parse_args(argv)
    state, _ = serve.load(args, serve.check_args(args))
    for llm in (gen, state.llm):
        scheduler = llm.core.scheduler
        assert (llm.cache.block_size, llm.cache.num_blocks, llm.block_manager.num_free_blocks) == (8, 20, 20)
        assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (3, 100)
        assert not llm.block_manager.enable_prefix_caching


@pytest.mark.parametrize("argv,reason", [
    (["--block-size", "0"], "block_size (--block-size) must be >= 1, got 0"),
    (["--kv-cache-memory", "-1"], "kv_cache_memory (--kv-cache-memory) must be >= 1"),
    (["--compile", "--no-cache"], "drop use_cache=False (--no-cache)"),
    (["--quantize", "int8", "--dtype", "bfloat16"], "quantize='int8' (--quantize int8) is for float32"),
])
def test_bad_values_give_one_line_errors(argv, reason):
    from generate import InputError, check_args

    with pytest.raises(InputError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_args(parse("generate.py", argv))


def test_llm_takes_a_config_or_its_fields():
    from builders import tiny_model

    from engine import LLM

    config = EngineConfig(device="cpu", block_size=4, num_blocks=9)
    for llm in (LLM(model=tiny_model(), config=config), LLM(model=tiny_model(), device="cpu", block_size=4,
                                                             num_blocks=9)):
        assert (llm.cache.block_size, llm.num_blocks) == (4, 9)
    with pytest.raises(ValueError, match="not both"):
        LLM(model=tiny_model(), config=config, block_size=8)
    with pytest.raises(TypeError):
        LLM(model=tiny_model(), block_sise=8)
