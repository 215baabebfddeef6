"""`etrm diagnose …` (issues 3 and 8 build this out)."""

import typer

app = typer.Typer(help="Diagnose checkpoints and runs.", no_args_is_help=True)


@app.command("act")
def act_command(run: str) -> None:
    """ACT behaviour of a run (placeholder)."""
