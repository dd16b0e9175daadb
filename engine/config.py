"""EngineConfig: the options of an LLM's engine, in one place (as vLLM's EngineArgs).

    llm = LLM("runs/a", config=EngineConfig(block_size=8, quantize="int8"))   # or LLM("runs/a", block_size=8, ...)

The same dataclass makes generate.py's and serve.py's engine flags: `add_cli_args(parser)` adds one
flag per field (its name, type, default, choices and help are the field's), `from_cli_args(args)`
builds and validates the config from the parsed flags. A new field is therefore a new flag of both
command lines (tests/test_engine_config.py checks it). torch is imported inside the methods only, so
that `--help` stays fast.
"""

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional, Union, get_args

DTYPES = ("float32", "bfloat16", "float16")


def option(default, help: str, **cli):
    """A field with its --help text; `cli` overrides the flag (flag="--no-cache") or adds choices."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineConfig:
    device: Union[str, "torch.device", None] = option(  # noqa: F821 (torch is imported late)
        "auto", "cpu, cuda, cuda:1, ... (default: cuda if available)")
    # None: bfloat16 on a CUDA device that supports it, else float32 (what the KV cache holds too)
    dtype: Union[str, "torch.dtype", None] = option(  # noqa: F821
        None, "weights and KV cache precision (default: bfloat16 on CUDA, float32 on CPU)", choices=DTYPES)
    block_size: int = option(16, "tokens per KV block")
    # None: enough blocks for max_num_seqs full-context sequences, capped by kv_cache_memory
    num_blocks: Optional[int] = option(None, "KV budget in blocks (default: from free memory)")
    kv_cache_memory: Optional[int] = option(
        None, "without --num-blocks, the KV budget in bytes (default: 30% of the device's free memory)")
    max_num_seqs: int = option(64, "samples decoded together at most")
    max_num_batched_tokens: Optional[int] = option(
        None, "new tokens a prefill step takes at most (default: the larger of 4096 and the context)")
    # blocks holding the same prompt prefix are shared between requests (block_manager.py)
    enable_prefix_caching: bool = option(True, "do not share the KV blocks of common prompt prefixes",
                                         flag="--no-prefix-caching")
    # False: every token by full recompute through the plain training forward, the reference the tests
    # compare against (serve.py always caches: it has no such flag)
    use_cache: bool = option(True, "decode by full recompute (the slow reference)", flag="--no-cache")
    # torch.compile the PyTorch decode step (CPU): a one-off compilation, in warmup() or the first steps,
    # 80-120 s for one sequence's three graphs with a cold Inductor cache, 22-35 s once that cache on
    # disk has them (the README's 2-core CPU at load 7-12; batches add two graphs); sets two global
    # compiler options and holds the weights as constants (engine/decode.py): make a new LLM after
    # changing them. 1.6-2x the eager step's decode tokens/s at batch 1 and 16; it replaces the C++
    # step, which was faster again at batch 1 (busy machine: 270 tokens/s, 185 compiled, 113 eager).
    compile: bool = option(False, "CPU: torch.compile the PyTorch decode step, the one MLA models use (a one-off "
                                  "compilation in the warm-up: 1-2 min, 20-40 s once Inductor's disk cache has "
                                  "it; needs a C++ compiler); MHA/GQA/MQA models otherwise decode through the "
                                  "faster C++ step")
    # False: decode through the PyTorch gather path, not the paged-attention kernel (Triton on CUDA; on
    # CPU a C++ kernel built on first use in about 15 s, kernels/paged_attention_cpu.py)
    paged_kernel: bool = option(True, "decode through the PyTorch gather path instead of the paged kernel")
    # int8 (CPU, float32): every linear layer with int8 weights and per-channel scales (engine/quantize.py;
    # a copy, the caller's model is unchanged), on the cached and the full-recompute path alike
    quantize: Optional[str] = option(
        None, "CPU: int8 weights with per-channel scales for every linear layer (engine/quantize.py)",
        choices=("int8",))
    # CPU: before each step lower torch's (process-wide) thread count to the cores other processes leave
    # free among those it may run on, never above its count when the LLM was made (engine/threads.py:
    # with one core busy, 2 threads decoded 3-4x slower than 1)
    adaptive_threads: bool = option(True, "CPU: keep torch's thread count fixed while other processes "
                                          "take cores")
    # CPU, MHA/GQA/MQA, float32 or int8, with the paged kernel, without compile: each decode step is one
    # C++ call for the whole forward (engine/decode.py), the same numbers as the PyTorch step; a model it
    # does not implement keeps the PyTorch step with a one-line warning, cpp_decode=False without one
    cpp_decode: bool = option(True, "CPU: decode with the PyTorch step instead of the one-call C++ step")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError, one line naming the option and its flag, for options that cannot work."""
        import torch

        for name in ("block_size", "num_blocks", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} ({flag_of(name)}) must be >= 1, got {value}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"unknown quantize '{self.quantize}': choose int8 or leave it unset")
        if isinstance(self.dtype, str) and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}': choose one of {', '.join(DTYPES)}")
        if self.compile and not self.use_cache:
            raise ValueError("compile (--compile) compiles the cached decode step: drop use_cache=False (--no-cache)")
        device = self.torch_device()
        if self.compile and device.type != "cpu":
            raise ValueError("compile (--compile) is for CPU decoding (CUDA decodes with the Triton paged kernel): "
                             "drop it or use device cpu (--device cpu)")
        if self.quantize and (device.type != "cpu" or self.torch_dtype() != torch.float32):
            raise ValueError("quantize='int8' (--quantize int8) is for float32 decoding on CPU (its kernel is a "
                             "CPU kernel)")

    def torch_device(self):
        """The device: "auto" (or None, as LLM's device was before) is cuda if available, else cpu."""
        import torch

        if self.device in ("auto", None):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return check_device(self.device)

    def torch_dtype(self):
        """The dtype: None is bfloat16 on a CUDA device that supports it, else float32."""
        import torch

        if self.dtype is None:
            cuda = self.torch_device().type == "cuda"
            return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        """One flag per field not in `exclude` (the fields a command line has no use for)."""
        group = parser.add_argument_group("engine options (EngineConfig, engine/config.py)")
        for f in fields(EngineConfig):
            if f.name in exclude:
                continue
            help = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
            if f.type is bool:  # a switch that turns the default around
                group.add_argument(flag_of(f.name), dest=f.name, action="store_false" if f.default else "store_true",
                                   help=help)
            else:
                group.add_argument(flag_of(f.name), dest=f.name, type=arg_type(f), default=f.default,
                                   choices=f.metadata.get("choices"), help=help)

    @staticmethod
    def from_cli_args(args: argparse.Namespace) -> "EngineConfig":
        """The config of parsed flags (fields without a flag keep their defaults); ValueError if invalid."""
        return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)})


def flag_of(name: str) -> str:
    """The field's flag, unless it names its own: --block-size for block_size, --no-cpp-decode for a
    switch that is on by default (cpp_decode)."""
    f = next(f for f in fields(EngineConfig) if f.name == name)
    return f.metadata.get("flag", ("--no-" if f.default is True else "--") + name.replace("_", "-"))


def arg_type(f):
    """int for Optional[int], str for Union[str, torch.device], ...: the first type the field allows."""
    return get_args(f.type)[0] if get_args(f.type) else f.type


def check_device(name):
    """torch.device(name), if this machine has it; else ValueError naming the fix."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}' (--device): use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} (--device): CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name} (--device): there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"device {name} (--device): only cpu and cuda are supported")
    return device
