"""The `mil` command: the root of the staged CLI (`mil extract …`, `mil train …`, `mil evaluate …`).

This is the one module in `mil/` that knows the stages: it mounts each stage's Typer app.
User mistakes (`MilError`) are printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mil.cli_runner import run_app
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
    """Console-script entry point. Exits 0 on success, 1 when some slides failed, 2 on a user mistake
    (one line; see `mil.cli_runner.run_app`)."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
