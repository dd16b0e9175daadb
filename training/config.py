"""The run configuration as typed dataclasses, registered with Hydra's ConfigStore.

Typed configs make Hydra reject a mistyped key (`train.max_step=10`) or a wrong type
(`train.lr=fast`) with a message naming it, before any work starts. The YAML files in conf/ pick
values; these classes say which keys exist and what they mean.
"""

import ast
import dataclasses
import inspect
import io
import os
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args, get_origin, get_type_hints

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data.config import DataConfig
from evaluation import require_harness
from model.attention import BACKENDS
from model.config import ModelConfig

from .errors import TrainConfigError

@dataclass
class TrainConfig:
    max_steps: int = 400  # optimizer steps; the LR schedule spans these
    max_minutes: Optional[float] = None  # wall-clock budget: stop (and save) once exceeded
    # with train.max_minutes: fit the LR schedule to the time, so that its decay ends inside the budget (the
    # run evaluates and saves after its first step to time both, and after its warmup fixes the schedule's
    # length to the steps that fit, printed and saved in its checkpoints; docs/training.md); false: the schedule
    # spans train.max_steps and the budget only stops the run, to be resumed (e.g. before a job's time limit)
    fit_schedule: bool = True
    batch_size: int = 32  # global sequences per optimizer step, whatever the number of processes
    seq_len: int = 128  # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1  # micro-batches per step: each process runs batch_size / (world * grad_accum)
    # muon: Muon for the attention and SwiGLU matrices, AdamW for embeddings, norms and the head
    # (training/optim.py); lower val loss in the same minutes (docs/recipe.md)
    optimizer: Annotated[str, Literal["adamw", "muon"]] = "muon"
    # peak learning rate (Muon's too: its update is scaled to AdamW's RMS). 4e-3: in make train's budget,
    # below 1e-3 and 2e-3 and level with 8e-3 (docs/recipe.md)
    lr: float = 4e-3
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    warmup_steps: int = 50  # steps of linear warmup from 0 to train.lr
    schedule: Annotated[str, Literal["cosine", "wsd"]] = "cosine"  # the LR's decay; wsd: warmup-stable-decay
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    weight_decay: float = 0.1  # applied to matrices only (not norms, not embeddings)
    beta1: float = 0.9  # AdamW's first-moment decay (Muon's momentum too)
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    log_every: int = 10  # steps between metrics.jsonl / wandb lines
    eval_every: int = 100  # steps between evaluations (val loss, perplexity, bits per byte, a sample)
    eval_batches: int = 10  # batches of batch_size sequences per evaluation
    sample_tokens: int = 120  # tokens generated for the sample at each evaluation
    # lm-evaluation-harness tasks scored at each evaluation on rank 0 and logged as <task>/<metric>
    # (evaluation/harness.py, as eval.py scores them; needs requirements-eval.txt): task names or YAML
    # files, e.g. [hellaswag,arc_easy]; null: none
    eval_tasks: Optional[list[str]] = None
    eval_tasks_limit: Optional[int] = None  # documents per train.eval_tasks task at each evaluation; null: all
    save_every: int = 200  # steps between checkpoints (also at the end, and at each new best evaluation)
    # checkpoints kept besides `best`: the newest N (1: `latest` only); each save deletes older ones
    keep_checkpoints: int = 1
    # true: continue from out_dir/checkpoints/latest; a path: continue from that checkpoint (or run) folder;
    # auto: continue if out_dir has a checkpoint, else start from step 0 (a requeued job: it also replaces the
    # metrics a previous attempt logged before its first save)
    resume: Any = False
    # train.resume=PATH at step N while out_dir holds checkpoints after N: delete them (refused without this)
    discard_later_checkpoints: bool = False
    overwrite: bool = False  # start a new run in an out_dir that holds one (deletes its checkpoints and metrics)
    # A checkpoint or run folder to start from: its weights, model config and tokenizer; fresh optimizer and step
    init_from: Optional[str] = None
    # torch.compile the training steps (training/trainer.py, compile_for_training): Inductor fuses the norms, RoPE,
    # SwiGLU and the residual adds (README, Performance), bitwise repeatable on CPU, its compilation cached in
    # .cache/torchinductor. auto: where it pays (training/plan.py, compiles: on the CPU in one process, a run
    # estimated at over 10 minutes; make train's is not), and eager with a warning where Inductor cannot compile;
    # true: everywhere, an error where it cannot; false: eager.
    compile: Annotated[Any, Literal[True, False, "auto"]] = "auto"
    # CPU: before each step, run torch on the cores other processes leave free (engine/threads.py, as
    # generation does by default; README, Performance). Off by default because results may depend on the
    # thread count (after two steps of the make-train model, 3 threads changed the weights' last bits where
    # 1 and 2 agreed): with it on, a run is no longer bitwise repeatable or exactly resumable.
    adaptive_threads: bool = False
    # Peak TFLOP/s of one device, the denominator of the logged `mfu`; null: estimated (training/metrics.py)
    peak_tflops: Optional[float] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # under torchrun: ddp (replicate) | fsdp (shard with FSDP2)
    parallel: Annotated[str, Literal["ddp", "fsdp"]] = "ddp"
    progress: bool = True  # show a progress bar

    def validate(self) -> None:
        """Each option's range and choice, and those that exclude each other: one error naming the option."""
        check_choices("train", self)
        rules = [(name, getattr(self, name) > 0, "positive") for name in ("max_steps", "batch_size", "seq_len",
                 "grad_accum", "eval_every", "eval_batches", "save_every", "log_every", "keep_checkpoints")]
        rules += [(name, getattr(self, name) >= 0, ">= 0")
                  for name in ("lr", "warmup_steps", "weight_decay", "grad_clip", "sample_tokens")]
        rules += [("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  ("decay_fraction", 0 < self.decay_fraction <= 1, "in (0, 1]"),
                  ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)")]
        rules += [(name, getattr(self, name) is None or getattr(self, name) > 0, f"positive (or null {without})")
                  for name, without in (("peak_tflops", "to estimate it"), ("max_minutes", "for no time budget"))]
        for name, ok, rule in rules:  # the first rule broken, in this order
            if not ok:
                raise TrainConfigError(f"train.{name}={getattr(self, name)} must be {rule}")
        if self.discard_later_checkpoints and self.resume in (False, True, "auto"):
            raise TrainConfigError("train.discard_later_checkpoints=true applies to train.resume=PATH (a checkpoint "
                                   f"folder), not train.resume={self.resume}: drop it, or name the checkpoint to "
                                   "resume from")
        d = self.device
        if not (d in ("auto", "cpu", "cuda", "mps") or d.startswith("cuda:") and d[5:].isdigit()):
            raise TrainConfigError(f"unknown train.device '{d}': choose auto, cpu, cuda, cuda:N or mps")
        if self.resume and self.overwrite:
            raise TrainConfigError("train.resume and train.overwrite exclude each other: continue the run, or replace "
                                   "it")


@dataclass
class AttentionRuntimeConfig:
    # auto: our Triton flash kernel on CUDA, our C++ kernel on CPU (SDPA where ours cannot run).
    # triton | cpu | sdpa | math force one.
    backend: Annotated[str, Literal[BACKENDS]] = "auto"

    def validate(self) -> None:
        check_choices("attention", self)


@dataclass
class WandbConfig:
    # offline (no account needed; `wandb sync` later) | online | disabled
    mode: Annotated[str, Literal["offline", "online", "disabled"]] = "offline"
    project: str = "small-llm"  # the wandb project the runs are logged to
    group: Optional[str] = None  # runs of one sweep share a group
    name: Optional[str] = None  # defaults to the attention variant
    tags: list[str] = field(default_factory=list)  # labels to filter runs by in wandb

    def validate(self) -> None:
        check_choices("wandb", self)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attention: AttentionRuntimeConfig = field(default_factory=AttentionRuntimeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # The run folder: checkpoints, metrics.jsonl, wandb files and Hydra's .hydra/. Default: Hydra's run
    # folder, runs/<date>/<time> (multirun: multirun/<date>/<time>/<job number>)
    out_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 1337  # the initial weights, the order of the batches and the samples' randomness


    def validate(self, world_size: int = 1) -> None:
        """Every option, each section's (their validate) and those that relate sections, the machine and a run of
        `world_size` processes: one error naming the option to change, before any work starts."""
        for section in (self.train, self.attention, self.wandb, self.model, self.data):
            section.validate()
        t, backend = self.train, self.attention.backend
        # Triton runs on CUDA, or anywhere in its (slow) interpreter, which the tests use on CPU.
        on_cuda = t.device not in ("cpu", "mps") and torch.cuda.is_available()
        gpu = "a GPU" if on_cuda else "mps"
        if backend == "triton" and not (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise TrainConfigError("attention.backend=triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's "
                                   "slow interpreter): use attention.backend=auto (our C++ kernel on CPU)")
        if backend == "cpu" and (on_cuda or t.device == "mps"):
            raise TrainConfigError("attention.backend=cpu is our C++ kernel for CPU training, but this run trains on "
                                   f"{gpu}: use attention.backend=auto")
        if t.adaptive_threads and (on_cuda or t.device == "mps"):
            raise TrainConfigError(f"train.adaptive_threads=true sets CPU threads, but this run trains on {gpu}: "
                                   "drop it, or train on the CPU (train.device=cpu)")
        if t.eval_tasks:
            if t.parallel == "fsdp":
                raise TrainConfigError("train.eval_tasks scores the whole model on one process, which "
                                       "train.parallel=fsdp shards: use train.parallel=ddp or drop train.eval_tasks")
            require_harness("train.eval_tasks")  # an EvalError: train.py prints it as it prints ours
        check_folder("out_dir", self.out_dir)
        check_folder("data.cache_dir", self.data.cache_dir)
        if t.batch_size % (world_size * t.grad_accum):
            raise TrainConfigError(f"train.batch_size ({t.batch_size}) must be divisible by processes x "
                                   f"train.grad_accum ({world_size} x {t.grad_accum})")
        if t.seq_len > self.model.max_seq_len:
            raise TrainConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")


def check_choices(section: str, config) -> None:
    """Each field typed Annotated[..., Literal[choices]] holds one of its choices. (OmegaConf refuses a bare
    Literal: Annotated keeps its type for OmegaConf and the choices for this check and --help.)"""
    for f in dataclasses.fields(config):
        allowed, value = choices(type(config), f.name), getattr(config, f.name)
        if allowed is not None and value not in allowed:
            names = typed(allowed)
            raise TrainConfigError(f"unknown {section}.{f.name} '{value}': choose {', '.join(names[:-1])} or "
                                   f"{names[-1]}")


def choices(cls, name: str) -> Optional[tuple]:
    """The Literal choices of field `name` of dataclass `cls`, or None if it has none."""
    hint = get_type_hints(cls, include_extras=True)[name]
    return next((get_args(m) for m in getattr(hint, "__metadata__", ()) if get_origin(m) is Literal), None)


def typed(allowed: tuple) -> list[str]:
    """Choices as the command line types them (true, not True)."""
    return [str(c).lower() if isinstance(c, bool) else c for c in allowed]


def check_folder(option: str, value: str) -> None:
    """A folder the run writes into: it must be (or become) a writable folder."""
    path = Path(os.path.expanduser(value))
    if path.exists() and not path.is_dir():
        raise TrainConfigError(f"{option}={value} is a file: choose a folder")
    nearest = path.resolve()  # it can be created or written if its nearest existing ancestor is a writable folder
    while not nearest.exists():
        nearest = nearest.parent
    if not (nearest.is_dir() and os.access(nearest, os.W_OK | os.X_OK)):
        raise TrainConfigError(f"{option}={value} cannot be written (read-only or not a folder): "
                               f"choose a writable {option}")


def validate(cfg, world_size: int = 1) -> None:
    """The one check of a run's options (make_plan calls it): `cfg`, an OmegaConf config, as the dataclasses."""
    OmegaConf.to_object(cfg).validate(world_size)  # ModelConfig validates as it is built


SECTIONS = (("", Config), ("train", TrainConfig), ("model", ModelConfig), ("data", DataConfig),
            ("attention", AttentionRuntimeConfig), ("wandb", WandbConfig))


def field_docs(cls) -> dict[str, tuple[str, str]]:
    """{field: (its default as written, its help)} of dataclass `cls`, sections left out. The help is the comment
    lines right above the field and the comment beside it, read with Python's own tokenizer."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or dataclasses.is_dataclass(defaults[node.target.id].type):
            continue
        row, above = node.lineno - 1, []
        while row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        beside = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        f = defaults[node.target.id]
        default = repr(f.default_factory()) if f.default_factory is not dataclasses.MISSING \
            else ast.get_source_segment(source, node.value)
        docs[node.target.id] = default, "\n".join(above + beside)
    return docs


def option_help() -> str:
    """Every option with its default and its help (the text of `train.py --help`)."""
    out = []
    for prefix, cls in SECTIONS:
        for name, (default, meaning) in field_docs(cls).items():
            key = f"{prefix}.{name}" if prefix else name
            allowed = choices(cls, name)
            if allowed is not None:
                meaning += f" (one of: {', '.join(typed(allowed))})"
            out.append(f"  {key} = {default}\n      " + meaning.replace("\n", "\n      "))
    return "\n".join(out)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # `python train.py --help`: the groups, then every option with its meaning (escaped for OmegaConf and
    # string.Template, which Hydra runs over the text).
    options = option_help().replace("$", "$$").replace("$${", "$\\${")
    cs.store(group="hydra/help", name="train", node={
        "app_name": "train.py",
        "header": "python train.py [group=option ...] [key=value ...]   (docs: README.md, Training)",
        "footer": "Hydra's own flags: python train.py --hydra-help",
        "template": "${hydra.help.header}\n\n== Groups (group=option) ==\n$APP_CONFIG_GROUPS\n\n"
                    "== Options (key=value; the default, then what it means) ==\n" + options +
                    "\n\n${hydra.help.footer}\n"})
