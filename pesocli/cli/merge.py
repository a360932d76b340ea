"""``peso merge``: fold the anchor (and optionally the final adapter) into one model folder."""

from __future__ import annotations

from pathlib import Path

import click

from pesocli.cli.common import run_command
from pesocli.cli.export import load, output_options, refuse_existing


@click.command(context_settings={"max_content_width": 110})
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Output model folder (written to a temporary sibling, then renamed).")
@click.option("--include-adapter", is_flag=True,
              help="Fold the final adapter in too (W0 + anchor + Delta W); default W~ = W0 + anchor only.")
@output_options
@run_command
def merge(run: Path, out: Path, include_adapter: bool, checkpoint: int | None, dtype: str, force: bool,
          device: str, verify: bool, skip_check: bool, base_weights: str) -> None:
    """Write W~ = W0 + anchor of RUN (a run folder) as one model folder that vLLM serves.

    Without --include-adapter the result is NOT the trained model: it is the base with the restart
    history folded in, the final adapter left out (its logits are checked against W0 + anchor). Serve
    it with the run's final adapter (the printed command uses RUN/export/anchored/adapter when the
    run has one), or continue training from it; --include-adapter writes the trained model itself.

    For a run on a quantised backbone, W0 is the dequantised base it trained on (--base-weights
    original: the full-precision weights); the logits difference between the two is printed.
    """
    from pesocli.export import ExportOptions, merge_run

    options = ExportOptions(dtype=dtype, force=force, check=not skip_check, verify=verify,
                            base_weights=base_weights)
    refuse_existing(out, force)
    loaded = load(run, checkpoint, device)
    merge_run(loaded, out, include_adapter=include_adapter, options=options, say=click.echo)
