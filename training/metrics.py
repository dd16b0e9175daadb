"""Metrics to `metrics.jsonl` (always) and Weights & Biases (offline by default), and the FLOP counts
behind the MFU that train.py logs and scripts/bench_train.py prints.

Only rank 0 logs; other ranks get a logger whose methods do nothing. metrics.jsonl is the source of
truth that the ablation report reads, so it works with wandb disabled.
"""

import json
import os
import re
import secrets
from pathlib import Path
from typing import Optional

import torch

from .errors import TrainingError

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets: CUDA trains under
# bf16 autocast. Matched as substrings of torch.cuda.get_device_name, first match wins.
CUDA_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0))
SIMD_FP32_LANES = {"AVX512": 16, "AVX2": 8}  # torch.backends.cpu.get_cpu_capability() -> fp32 lanes per FMA


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of `model` (a Transformer) on windows of `seq_len`.

    MFU, model FLOPs utilisation, is tokens/s x this / the device's peak FLOP/s (`peak_flops`). As in the
    PaLM paper's appendix B: every weight of a matmul costs 2 FLOPs per token forward and 4 backward
    (gradients of the input and of the weight), so 6 x the matmul weights (every nn.Linear, the LM head
    included; the embedding is a lookup, not a matmul). Attention adds, per layer and head, q.k over the
    window and probs.v (2 x seq_len x head width each, forward; twice that backward), halved because the
    causal mask leaves half of the score matrix out. Norms, RoPE, SwiGLU's gate and the optimizer are
    not counted: MFU measures useful matmul work, so time spent on them lowers it.
    """
    cfg = model.cfg
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    qk_v_width = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim if cfg.attention == "mla"
                  else 2 * cfg.head_dim)
    return 6 * matmul_weights + 6 * cfg.n_layers * cfg.n_heads * qk_v_width * seq_len / 2


def cpu_max_mhz() -> Optional[float]:
    """The highest clock the kernel reports: cpufreq's maximum if there is one, else the largest
    `cpu MHz` in /proc/cpuinfo (virtual machines often have only that); None where neither exists."""
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if cpufreq.exists():
        return int(cpufreq.read_text()) / 1000
    cpuinfo = Path("/proc/cpuinfo")
    mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return max(map(float, mhz)) if mhz else None


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """The device's peak FLOP/s for training, the denominator of MFU; None if unknown (no MFU then).

    CPU (fp32): cores x fp32 lanes of the widest SIMD torch dispatches to (AVX2 8, AVX-512 16) x 2 FMA
    units per core x 2 FLOPs per FMA x the maximum clock, where cores are the threads torch uses (at
    most the cores this process may run on). Two FMA units is what x86 server cores since Haswell and
    Zen 2 have; a CPU with one makes MFU read half of what it is. CUDA: the table above by device name.
    `override_tflops` replaces the estimate (a GPU not in the table, or a better-known peak)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((tflops * 1e12 for key, tflops in CUDA_PEAK_TFLOPS if key in name), None)
    if device.type != "cpu":
        return None
    mhz = cpu_max_mhz()
    lanes = SIMD_FP32_LANES.get(torch.backends.cpu.get_cpu_capability(), 4)  # SSE: 4
    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
    return cores * lanes * 2 * 2 * mhz * 1e6 if mhz else None


class MetricsLogger:
    def __init__(self, out_dir: Path, config: dict, wandb_cfg, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        if wandb_cfg.mode != "disabled":
            self.run = self._start_wandb(Path(out_dir), config, wandb_cfg, resume=resume_step is not None)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint: those steps run again. A crash mid-write
        leaves a torn last line: it is dropped too (its step runs again)."""
        if not self.path.exists():
            return
        lines, kept = [line for line in self.path.read_text().splitlines() if line], []
        for i, line in enumerate(lines):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line can be cut short by a crash; anything else is damage
                    raise TrainingError(f"{self.path} line {i + 1} is not JSON: repair or delete that line, "
                                        "then resume") from None
        self.path.write_text("".join(line + "\n" for line in kept))

    @staticmethod
    def _start_wandb(out_dir: Path, config: dict, wandb_cfg, resume: bool):
        import wandb  # imported here: a disabled run should not pay for the import

        # Keep the run id beside the checkpoints so a resumed run continues the same wandb run.
        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(
            mode=wandb_cfg.mode, project=wandb_cfg.project, group=wandb_cfg.group, name=wandb_cfg.name,
            tags=list(wandb_cfg.tags), config=config, dir=os.environ.get("WANDB_DIR", str(out_dir)),
            id=run_id, resume="allow", settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, str)},
                         step=record["step"])

    def log_text(self, key: str, text: str, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            import wandb

            self.run.finish()
            # finish() can return before wandb's service has flushed an offline run to disk; teardown
            # waits for it, so the run folder is complete (and syncable) when train.py returns.
            wandb.teardown()
            self.run = None
