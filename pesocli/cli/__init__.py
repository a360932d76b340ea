"""The ``peso`` command group: only the group and its ``add_command`` lines.

Each subcommand lives in its own module and imports torch/transformers inside its body, so
``peso --help`` is instant.
"""

from __future__ import annotations

import click

from pesocli import __version__
from pesocli.cli.common import version_report
from pesocli.cli.configs import configs
from pesocli.cli.eval import eval_command
from pesocli.cli.export import export
from pesocli.cli.inspect import restart_inspect
from pesocli.cli.merge import merge
from pesocli.cli.train import train


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_report(__version__))
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the versions of peso, torch, transformers, peft, bitsandbytes and python.")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors (same as PESO_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """peso: fine-tune causal LMs with PESO-LoRA-R/T and other low-rank methods."""
    ctx.ensure_object(dict)["debug"] = debug


main.add_command(train)
main.add_command(eval_command)
main.add_command(restart_inspect)
main.add_command(export)
main.add_command(merge)
main.add_command(configs)
