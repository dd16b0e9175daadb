"""Metrics to `metrics.jsonl` (always) and Weights & Biases (offline by default).

Only rank 0 logs; other ranks get a logger whose methods do nothing. metrics.jsonl is the source of
truth that the ablation report reads, so it works with wandb disabled.
"""

import json
import secrets
import os
from pathlib import Path
from typing import Optional

from .errors import TrainingError


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
        lines = [line for line in self.path.read_text().splitlines() if line]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append((json.loads(line), line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line can be cut short by a crash; anything else is damage
                    raise TrainingError(f"{self.path} line {i + 1} is not JSON: repair or delete that line, "
                                        "then resume") from None
        kept = [line for record, line in records if record["step"] <= step]
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
