"""``peso restart-inspect``: what every restart of a run did, read from its run folder.

``read_run_log(run)`` reads ``metrics.jsonl`` / ``restarts.jsonl`` (also while the run is still
writing them), ``summarize(log)`` gives one :class:`RestartSummary` per restart, ``match_layers`` +
``layer_history`` the per-layer drill-down, ``write_plots`` the PNGs. Nothing here imports torch.
"""

from pesocli.inspect.plots import PLOT_FILES, write_plots
from pesocli.inspect.report import print_layers, print_summary, report_json
from pesocli.inspect.runlog import RunLog, read_jsonl, read_run_log
from pesocli.inspect.summary import LOSS_AFTER_STEPS, RestartSummary, layer_history, match_layers, summarize

__all__ = [
    "LOSS_AFTER_STEPS",
    "PLOT_FILES",
    "RestartSummary",
    "RunLog",
    "layer_history",
    "match_layers",
    "print_layers",
    "print_summary",
    "read_jsonl",
    "read_run_log",
    "report_json",
    "summarize",
    "write_plots",
]
