"""`etrm`: one command for the whole workflow. Each command group lives beside the code it drives."""

from __future__ import annotations

import sys

import typer

from etrm import __version__
from etrm.errors import EtrmError

app = typer.Typer(
    name="etrm",
    help="Encoder-based Tiny Recursive Models: few-shot ARC-AGI from demonstration pairs alone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"etrm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """data build → train → eval --vote → diagnose → report."""


def _register() -> None:
    from etrm.data.cli import app as data_app
    from etrm.diagnose.cli import app as diagnose_app
    from etrm.eval.cli import eval_command
    from etrm.quickstart import quickstart_command
    from etrm.report.cli import report_command, sweep_app
    from etrm.train.cli import presets_command, train_command

    app.add_typer(data_app, name="data")
    app.command("train")(train_command)
    app.command("presets")(presets_command)
    app.command("eval")(eval_command)
    app.add_typer(diagnose_app, name="diagnose")
    app.command("report")(report_command)
    app.add_typer(sweep_app, name="sweep")
    app.command("quickstart")(quickstart_command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        # Outside standalone mode click returns (not raises) a command's `typer.Exit(code)`.
        exit_code = app(args=argv, standalone_mode=False)
        if isinstance(exit_code, int) and exit_code:
            sys.exit(exit_code)
    except EtrmError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
