"""The measuring library behind ``scripts/bench_methods.py`` and ``scripts/bench_restarts.py``.

- :mod:`benchlib.models`: the backbones (tiny, random 100M Llama, SmolLM2-135M) and random batches.
- :mod:`benchlib.side`: one method on a model and one timed step in ``peso train``'s order.
- :mod:`benchlib.meter`: peak memory of a timed process (CUDA allocator, Linux counters).
- :mod:`benchlib.workers`: the worker processes (one method alone, or all interleaved).
- :mod:`benchlib.summary`: per-run figures, medians, ratio tables, JSON helpers.
- :mod:`benchlib.plots`, :mod:`benchlib.micro`: the figure; one-layer and LoRA-vs-PEFT diagnostics.

Imported from the scripts folder (``python scripts/bench_methods.py`` puts it on ``sys.path``).
"""
