"""`etrm eval` (issue 6 builds this out)."""


def eval_command() -> None:
    """Evaluate a run (placeholder)."""
