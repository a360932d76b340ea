"""``peso configs``: list the ready-made run configs, ``peso configs cp NAME DEST`` copies one out.

``peso train --config NAME`` takes the same names from any working directory (they ship inside the
package as ``pesocli._commands``; in a checkout they are ``commands/``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from pesocli.cli.common import run_command


def _summary(path: Path) -> str:
    """The first comment line of a config file, without ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


@click.group("configs", invoke_without_command=True, context_settings={"max_content_width": 110})
@click.pass_context
@run_command
def configs(ctx: click.Context) -> None:
    """List the shipped run configs (use one with peso train --config NAME; copy one with cp)."""
    if ctx.invoked_subcommand is not None:
        return
    from pesocli.config import commands_dir, shipped_configs

    found = shipped_configs()
    width = max(map(len, found), default=0)
    for name, path in found.items():
        click.echo(f"{name:<{width}}  {_summary(path)}")
    click.echo(f"\n{len(found)} configs in {commands_dir()}; peso train --config NAME, or "
               "peso configs cp NAME DEST to edit one")


@configs.command("cp")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing DEST file.")
@run_command
def copy(name: str, dest: Path, force: bool) -> None:
    """Copy the shipped config NAME to DEST (a file, or a folder to put NAME.yaml in)."""
    from pesocli.config import shipped_configs, unknown_config
    from pesocli.errors import ConfigError

    stem = name.removesuffix(".yaml")
    shipped = shipped_configs()
    if stem not in shipped:
        raise ConfigError(unknown_config(stem))
    source = shipped[stem]
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    click.echo(f"wrote {target}; run it with: peso train --config {target}")
