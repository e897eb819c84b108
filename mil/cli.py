"""The `mil` command: the root of the staged CLI (`mil extract …`, `mil train …`, `mil evaluate …`).

This is the one module in `mil/` that knows the stages: it mounts each stage's Typer app.
User mistakes (`MilError`) are printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import sys

import typer

from mil.errors import MilError
from mil.extract.cli import app as extract_app
from mil.train.cli import app as train_app
from mil.evaluate.cli import app as evaluate_app

app = typer.Typer(
    help="Needle MIL: whole-slide images and slide labels in, slide classifiers out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(extract_app, name="extract")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")


def _print_version(value: bool) -> None:
    if value:
        from mil import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
) -> None:
    """Needle MIL: whole-slide images and slide labels in, slide classifiers out."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Exits 0 on success, 1 when some slides failed, 2 on a user mistake."""
    try:
        app(args=argv)  # standalone mode: usage errors print click's message and exit 2
    except MilError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
