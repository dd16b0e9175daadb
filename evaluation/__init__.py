"""Evaluation beyond the validation loss (eval.py is its command line; docs/evaluation.md).

    harness.py  lm-evaluation-harness tasks on the paged engine: EngineLM (the harness's model
                interface), load_tasks / run_tasks, and task_metrics for train.eval_tasks
    text.py     bits per byte of a text file, scored as training scores its validation split

Inference code: it imports the engine, never training/ (training imports it for train.eval_tasks).
lm-evaluation-harness is an optional extra (requirements-eval.txt): only harness.py imports it.
"""

class EvalError(ValueError):
    """Bad evaluation input (a task name, a task file, an option): one line that names the fix."""


def require_harness(who: str) -> None:
    """EvalError unless lm-evaluation-harness imports; `who` needs it (eval.py, train.eval_tasks)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(f"{who} needs lm-evaluation-harness: pip install -r requirements-eval.txt") from None
