"""``peso export``: write a run as safetensors that vLLM serves; ``peso export --check DIR`` validates.

Only option parsing here; :mod:`pesocli.export` does the work (imported inside the body so
``peso --help`` stays instant).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pesocli.cli.common import run_command

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
FORMAT_CHOICES = ("anchored", "adapter", "merged")


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``peso export`` and ``peso merge`` (defined once)."""
    options = [
        click.option("--checkpoint", type=int, default=None, metavar="STEP",
                     help="Export checkpoints/step-STEP instead of final/."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                     help="dtype of the written weights; auto = the backbone's (fp32 for a CPU run)."),
        click.option("--force", is_flag=True, help="Replace an existing --out folder."),
        click.option("--device", default="auto", show_default=True,
                     help="Where to rebuild the model and merge: auto (CUDA when available), cpu, cuda[:N]."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Reload what was written (transformers + peft) and print its logits error "
                          "against the trained model."),
        click.option("--no-check", "skip_check", is_flag=True,
                     help="Skip the vLLM rules check that runs before the output is moved into place."),
        click.option("--base-weights", type=click.Choice(("dequantised", "original")), default="dequantised",
                     show_default=True,
                     help="Runs on a quantised (nf4/fp4/int8) backbone: write W0 as the dequantised base the "
                          "run trained on (reproduces training) or as the original full-precision weights; "
                          "the logits difference between the two is printed either way."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command(context_settings={"max_content_width": 110})
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="anchored", show_default=True,
              help="anchored: OUT/model (W0 + anchor) + OUT/adapter (final LoRA). adapter: one LoRA on the "
                   "untouched base (anchor and adapter stacked). merged: one dense model folder.")
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Output folder (written to a temporary sibling, then renamed). Required with RUN.")
@click.option("--max-rank", type=int, default=512, show_default=True,
              help="Largest LoRA rank to write. A wider adapter is cut per layer by truncated SVD to the "
                   "largest vLLM rank <= this (1, 8, 16, 32, 64, 128, 256, 320, 512).")
@click.option("--max-error", type=float, default=0.01, show_default=True,
              help="Refuse a compressed adapter whose relative Frobenius error in any layer is above this.")
@click.option("--allow-lossy", is_flag=True, help="Write a compressed adapter even above --max-error.")
@click.option("--adapter-name", default="peso", show_default=True,
              help="LoRA name in the vllm serve command (--lora-modules NAME=PATH) and the LoRARequest.")
@output_options
@click.option("--check", "check_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Do not export: validate DIR (an export, an adapter folder or a model folder) against "
                   "vLLM's rules, print one line per problem, exit 1 when there is any.")
@click.option("--base", default=None, metavar="MODEL",
              help="With --check: the base model (folder or cached id) to check an adapter's module paths "
                   "against (default: the export's manifest, or base_model_name_or_path).")
@click.option("--max-lora-rank", type=int, default=None, metavar="N",
              help="With --check: the vllm serve --max-lora-rank the adapter must fit (default: the export's "
                   "serve command, else 512). vLLM's own PEFTHelper checks it when vllm is installed.")
@run_command
def export(run: Path | None, fmt: str, out: Path | None, max_rank: int, max_error: float, allow_lossy: bool,
           adapter_name: str, checkpoint: int | None, dtype: str, force: bool, device: str, verify: bool,
           skip_check: bool, base_weights: str, check_dir: Path | None, base: str | None,
           max_lora_rank: int | None) -> None:
    """Export RUN (a run folder) for vLLM, or validate a folder with --check DIR.

    \b
    peso export runs/x --out exports/x                    # anchored (default)
    peso export runs/x --format adapter --out exports/x-lora --max-rank 64
    peso export runs/x --format merged --dtype bf16 --out exports/x-merged
    peso export --check exports/x
    """
    if check_dir is not None:
        if run is not None:
            raise click.UsageError("give either RUN (to export) or --check DIR (to validate), not both")
        _check(check_dir, base, max_lora_rank)
        return
    if run is None:
        raise click.UsageError("missing RUN (a run folder), or --check DIR")
    if out is None:
        raise click.UsageError("missing --out DIR")
    from pesocli.export import ExportOptions, export_run

    options = ExportOptions(dtype=dtype, max_rank=max_rank, max_error=max_error, allow_lossy=allow_lossy,
                            adapter_name=adapter_name, force=force, check=not skip_check, verify=verify,
                            base_weights=base_weights)
    refuse_existing(out, force)
    loaded = load(run, checkpoint, device)
    export_run(loaded, fmt, out, options, say=click.echo)


def refuse_existing(out: Path, force: bool) -> None:
    """An existing ``--out`` without ``--force`` is refused before any model is loaded."""
    from pesocli.errors import PesoError

    if out.exists() and not force:
        raise PesoError(f"{out} exists; pass --force to replace it")


def load(run: Path, checkpoint: int | None, device: str):
    """``load_run`` on the resolved device (shared with ``peso merge``)."""
    from pesocli.models import resolve_device
    from pesocli.runs import load_run

    loaded = load_run(run, checkpoint, device=str(resolve_device(device)))
    click.echo(f"loaded {loaded.state_dir} ({loaded.method_name}, step {loaded.step}, "
               f"model {loaded.cfg.model.name})")
    return loaded


def _check(folder: Path, base: str | None, max_lora_rank: int | None) -> None:
    from pesocli.export import check_path

    problems = check_path(folder, base, max_lora_rank)
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} problem(s): {folder} is not ready for vLLM", err=True)
        sys.exit(1)
    click.echo(f"ok: {folder} passes every vLLM check")
