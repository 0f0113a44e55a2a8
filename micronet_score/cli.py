"""The ``micronet-score`` command line: parse, call the library, render. No counting logic lives here."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Annotated

import typer
from typer.core import TyperGroup

from micronet_score import __version__
from micronet_score.errors import MicronetError
from micronet_score.render import console, error_console, render_rules
from micronet_score.ruleset import DEFAULT_RULES, bundled_rule_names, load_rules


class _Group(TyperGroup):
    """Turns a MicronetError into one clear line on stderr and exit code 2 (a traceback only with --debug)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except MicronetError as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            error_console().print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="micronet-score",
    help="Score PyTorch models by the NeurIPS 2019 MicroNet Challenge rules: storage, operations, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"micronet-score {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")] = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Score PyTorch models by the NeurIPS 2019 MicroNet Challenge rules."""


@app.command("rules")
def rules_command(
    name: Annotated[
        str, typer.Argument(help="A bundled rule set name or the path of a rule file (.toml).")
    ] = DEFAULT_RULES,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rule set as JSON.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the bundled rule sets.")] = False,
) -> None:
    """Show a rule set: tracks and baselines, bit-width policies, and the price of every op family.

    Examples:

      micronet-score rules

      micronet-score rules micronet-2019 --json

      micronet-score rules ./my-rules.toml
    """
    if list_:
        for bundled in bundled_rule_names():
            print(bundled)
        return
    rules = load_rules(name)
    if as_json:
        sys.stdout.write(json.dumps(rules.model_dump(mode="json"), indent=2) + "\n")
    else:
        render_rules(rules, console())


def main() -> None:
    app()
