"""The errors the trainer raises for a problem the user can fix; train.py prints them as one `error:` line."""


class TrainConfigError(ValueError):
    """A training option out of range or inconsistent (train.*, attention.*, out_dir, wandb.*)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says what to change."""
