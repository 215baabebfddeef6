"""`etrm report` and `etrm sweep` (issue 8 builds these out)."""

import typer

sweep_app = typer.Typer(help="Experiment sweeps.", no_args_is_help=True)


@sweep_app.command("overfit")
def overfit_command() -> None:
    """Overfit sweep commands (placeholder)."""


def report_command() -> None:
    """Compare runs (placeholder)."""
