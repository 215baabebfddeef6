"""`etrm data …` (issue 2 builds this out)."""

import typer

from etrm.data.synth_cli import synth_command

app = typer.Typer(help="Build, inspect and verify datasets.", no_args_is_help=True)
app.command("synth")(synth_command)


@app.command("info")
def info_command(path: str) -> None:
    """Show a dataset's manifest (placeholder until the dataset builder lands)."""
    raise typer.Exit(1)
