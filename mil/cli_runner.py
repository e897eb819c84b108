"""Running a Typer app as `mil` does: every user mistake is one line on stderr and exit status 2.

Shared by the `mil` command (`mil.cli.main`) and by the entry points that run one command on its
own (`python -m mil.extract.moco.cli`, which torchrun starts), so both speak alike.
"""

from __future__ import annotations

import re
import sys

import typer

from mil.errors import MilError

_CHOICE = re.compile(r"Invalid value for '([^']+)': (?:Value error, )?(.+?) is not one of (.+?)\.?$")


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run `app` on `argv`; exit 0 on success, 1 when some slides failed (``typer.Exit(1)``), 2 on a user mistake.

    A user mistake — a `MilError` from a stage, or a command-line error that click finds (an unknown
    option, ``--epochs abc``, a value outside an option's choices) — is printed as one line.
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
        typer.echo(f"error: {where}{house_style(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    if isinstance(rc, int) and rc != 0:  # typer.Exit(code), e.g. 1 when some slides failed
        sys.exit(rc)


def house_style(message: str) -> str:
    """Click's message for a value outside an option's choices, said as every other error is."""
    m = _CHOICE.match(message.strip())
    return f"expected {m[1]} to be one of {m[3]}, got {m[2]} instead." if m else message


def _is_click_error(e: Exception) -> bool:
    """A click `ClickException` (usage errors, bad parameters), from click or Typer's vendored copy."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "format_message")
