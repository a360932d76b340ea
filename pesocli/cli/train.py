"""``peso train``: build the run config (command line > YAML > defaults) and hand it to the trainer.

This module only parses options; ``pesocli.train.run_training`` does (and prints) everything else.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from pesocli.cli.common import config_option, debug_enabled, parse_settings, report_failure, run_command

# (option, config key, click type, help): each named option sets exactly one config key.
CONFIG_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--model", "model.name", str,
     "Model: 'tiny', a local folder, a .gguf file, a cached Hugging Face id or an alias (smollm2-135m)."),
    ("--method", "method.name", str,
     "Method: lora, lora-one, peso-r, peso-t, lorsum, lorsum-scaled, rac-lora, galore, relora."),
    ("--data", "data.path", str, "Training data: a JSONL/JSON file or a folder of them."),
    ("--format", "data.format", str,
     "Record format: auto, text, alpaca, messages, sharegpt or prompt-completion."),
    ("--rank", "method.rank", int, "Adapter rank r."),
    ("--alpha", "method.alpha", float, "LoRA alpha (scale alpha / r)."),
    ("--lr", "optim.lr", float, "Peak learning rate."),
    ("--max-steps", "train.max_steps", int, "Optimizer steps (wins over --epochs)."),
    ("--epochs", "train.epochs", float, "Passes over the data when --max-steps is not set."),
    ("--batch-size", "train.batch_size", int, "Sequences per micro-batch."),
    ("--grad-accum", "train.grad_accum", int, "Micro-batches per optimizer step."),
    ("--restart-every", "method.restart_every", int, "Restart period K in steps (peso-r and similar)."),
    ("--seed", "train.seed", int, "Random seed."),
    ("--output-dir", "train.output_dir", str, "Folder holding the run folders."),
    ("--run-name", "train.run_name", str, "Run folder name (None: <method>-<timestamp>)."),
    ("--dtype", "model.dtype", str, "Backbone precision: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."),
    ("--device", "train.device", str, "Device: auto, cpu, cuda or cuda:N."),
    ("--eval-every", "train.eval_every", int, "Validation loss every N steps (0: only at the end)."),
    ("--val-split", "data.val_split", float, "Fraction of the records held out for validation."),
    ("--max-length", "data.max_length", int, "Truncate examples to this many tokens."),
    ("--checkpoint-every", "checkpoint.every", int,
     "Write a resumable checkpoint (adapters, anchors, optimizer; no base weights) every N steps (0: none "
     "by steps)."),
    ("--checkpoint-minutes", "checkpoint.every_minutes", float,
     "Also write one after this many minutes since the last (0: none by time; with --checkpoint-every 0 "
     "only final/, and on SIGINT/SIGTERM)."),
    ("--keep-last", "checkpoint.keep_last", int, "Step checkpoints to keep, newest first (0: all)."),
    ("--nan-policy", "train.nan_policy", click.Choice(["stop", "skip"]),
     "Non-finite loss/gradient or loss spike: stop (write the last good state, exit 1) or skip the update."),
    ("--quant", "model.quant", click.Choice(["none", "nf4", "fp4", "int8"]),
     "Backbone quantisation through bitsandbytes (the base is never written; restarts go to the anchor)."),
    ("--export", "train.export", str,
     "Exports written into RUN/export/ when training ends: anchored, adapter, merged (comma-separated) "
     "or none."),
    ("--loss-spike-factor", "train.loss_spike_factor", float,
     "Treat a loss above this factor x the median of the last 20 steps like a non-finite one."),
    ("--nproc", "train.nproc", int,
     "Processes (one per GPU), started through torchrun; global batch: nproc x batch size x grad accum."),
)

CONFIG_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--trust-remote-code", "model.trust_remote_code", "Allow the model folder's own Python code to run."),
    ("--overwrite", "train.overwrite", "Replace an existing run folder of the same name."),
    ("--quiet", "train.quiet", "No progress bar or summary table."),
    ("--gradient-checkpointing", "model.gradient_checkpointing",
     "Recompute activations in the backward (less memory; restart sketches stay exact)."),
    ("--fsdp", "train.fsdp",
     "Shard the frozen backbone over the --nproc processes (FSDP2) when it does not fit one device."),
)


def _param_name(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


OPTION_KEYS: dict[str, str] = {_param_name(opt): key for opt, key, *_ in (*CONFIG_OPTIONS, *CONFIG_FLAGS)}
"""Click parameter name -> dotted config key."""


def _config_options(fn: Any) -> Any:
    # Decorators apply bottom-up: the last one applied is listed first in --help.
    for option, key, text in reversed(CONFIG_FLAGS):
        fn = config_option(option, key=key, is_flag=True, help=text)(fn)
    for option, key, kind, text in reversed(CONFIG_OPTIONS):
        fn = config_option(option, key=key, type=kind, help=text)(fn)
    return fn


@click.command(context_settings={"max_content_width": 110})
@click.option("--config", "config_arg", metavar="FILE|NAME",
              help="YAML run config: a file, or the name of a shipped one (peso configs lists them, e.g. "
                   "smollm2-135m-peso-r). Default: tiny-peso-r for the tiny model, none (the defaults "
                   "below) for any other.")
@_config_options
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", callback=parse_settings,
              help="Set any config key, e.g. --set optim.warmup_ratio=0.1 (repeatable; named options win).")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved config, dataset statistics and the first example, then exit.")
@click.option("--no-color", is_flag=True,
              help="No colour in the output (as NO_COLOR=1 does): the --dry-run example marks untrained "
                   "tokens with [masked]...[/masked], as it does whenever stdout is not a terminal.")
@click.option("--resume", metavar="RUN|auto",
              help="Continue the run folder RUN exactly from its newest good checkpoint (its config.yaml "
                   "is the base config). 'auto': resume this command's run (--run-name, or the newest "
                   "unfinished run in --output-dir with the same config), or start fresh if there is none. "
                   "Only logging, eval, checkpoint, device, --nan-policy and --loss-spike-factor settings "
                   "may change.")
@run_command
def train(
    config_arg: str | None, settings: dict[str, str], dry_run: bool, no_color: bool, resume: str | None,
    **options: Any,
) -> None:
    """Fine-tune a causal LM. Command-line options override the YAML config, which overrides the defaults.

    Without --config and without --model (or with --model tiny), the run is the embedded demo,
    commands/tiny-peso-r.yaml (the built-in tiny Llama on the shipped arithmetic data, about 25 s on a
    CPU), which sets some keys away from the defaults listed below. Any other model without --config
    starts from the defaults listed below (one epoch over --data).
    """
    from pesocli.config import default_config_path, load_config, resolve_config

    config_path = resolve_config(config_arg) if config_arg is not None else None

    if no_color:
        os.environ["NO_COLOR"] = "1"  # read by every rich console made later (and by torchrun's processes)
    overrides: dict[str, Any] = dict(settings)
    for name, value in options.items():
        if value is not None and value is not False:  # flags only ever switch a setting on
            overrides[OPTION_KEYS[name]] = value
    run_dir = None
    if resume is not None:
        from pesocli.train.resume import resolve_resume

        cfg, run_dir = resolve_resume(resume, config_path, overrides)
    else:
        yaml_path = config_path if config_path is not None else default_config_path(overrides)
        cfg = load_config(yaml_path, overrides)

    from pesocli.train import distributed

    if cfg.train.nproc > 1 and distributed.launched_rank() is None:
        # start nproc processes of this very command (the resolved config, so all agree on the run)
        sys.exit(distributed.launch(cfg, resume=run_dir, dry_run=dry_run, debug=debug_enabled()))

    from pesocli.train import run_training

    one_of_several = distributed.launched_rank() is not None  # torchrun or --nproc started us
    try:
        if run_dir is not None:
            run_training(cfg, dry_run=dry_run, resume=run_dir)
        else:
            run_training(cfg, dry_run=dry_run)
    except BaseException as exc:
        if not one_of_several:
            raise  # run_command reports it
        # Say it (an error every process raised is said by rank 0 alone), then leave without the
        # interpreter's teardown (see leave_now).
        said_by_rank_0 = getattr(exc, "reported_by_rank_0", False) and not debug_enabled()
        distributed.leave_now(exc.exit_code if said_by_rank_0 else report_failure(exc))
    if one_of_several:
        distributed.leave_now(0)
