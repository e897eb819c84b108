"""The `mil` command: the root of the staged CLI (`mil extract …`, `mil train …`, `mil evaluate …`).

This is the one module in `mil/` that knows the stages: it mounts each stage's Typer app.
User mistakes (`MilError`) are printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

from mil.errors import MilError
from mil.evaluate.cli import app as evaluate_app
from mil.extract.cli import app as extract_app
from mil.train.cli import app as train_app

app = typer.Typer(
    help="Needle MIL: whole-slide images and slide labels in, slide classifiers out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _config_callback(stage: str):
    """The group callback of `mil STAGE`: ``--config FILE`` sets the defaults of its commands (`mil.config_file`)."""

    def callback(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(  # noqa: B008 — typer's declaration, not a shared default
            None, "--config", help="YAML file of options (the workflow's config.yaml schema); the command line overrides it."
        ),
    ) -> None:
        if config is None:
            return
        from mil.config_file import default_map

        commands = {name: [p.name for p in cmd.params] for name, cmd in ctx.command.commands.items()}
        ctx.default_map = {**(ctx.default_map or {}), **default_map(config, stage, commands)}

    return callback


app.add_typer(extract_app, name="extract", callback=_config_callback("extract"))
app.add_typer(train_app, name="train", callback=_config_callback("train"))
app.add_typer(evaluate_app, name="evaluate", callback=_config_callback("evaluate"))


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
    """Console-script entry point. Exits 0 on success, 1 when some slides failed, 2 on a user mistake.

    Every user mistake — a `MilError` from a stage, or a command-line error that click finds (an
    unknown option, ``--epochs abc``) — is printed as one line and exits with status 2.
    """
    try:
        rc = app(args=argv, standalone_mode=False)  # returns exit codes instead of calling sys.exit
    except MilError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:
        if type(e).__name__ == "Abort":  # click's Abort (EOF at a prompt)
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        if not _is_click_error(e):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `mil train` alone: its help, as in standalone mode
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {where}{_house_style(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    if isinstance(rc, int) and rc != 0:  # typer.Exit(code), e.g. 1 when some slides failed
        sys.exit(rc)


_CHOICE = re.compile(r"Invalid value for '([^']+)': (?:Value error, )?(.+?) is not one of (.+?)\.?$")


def _house_style(message: str) -> str:
    """Click's message for a value outside an option's choices, said as every other error is."""
    m = _CHOICE.match(message.strip())
    return f"expected {m[1]} to be one of {m[3]}, got {m[2]} instead." if m else message


def _is_click_error(e: Exception) -> bool:
    """A click `ClickException` (usage errors, bad parameters), from click or Typer's vendored copy."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "format_message")


if __name__ == "__main__":
    main()
