"""Sketched vs exact top-r SVD of one layer's full gradient, by layer shape: time, memory, accuracy.

A layer's full gradient is ``G = grad_out^T x (out, in)`` summed over the restart tokens. Here
``x (T, in)`` and ``grad_out (T, out)`` are random low-rank-plus-noise activations that share a
token latent, so ``G`` has a power-law spectrum ``sigma_i ~ i^-decay`` over ``--latent`` directions
plus a noise floor. Three paths compute its top-r singular triplets:

- ``sketch``: ``pesocli.fullgrad.estimate_full_gradients`` itself, on a stand-in layer whose
  ``run_pass`` hands the probes ``(x, grad_out)`` exactly as a layer's backward does
  (``G Omega = grad_out^T (x Omega)``, ``G^T Q = x^T (grad_out Q)``): its ``2 q + 2`` products
  (in one pass: ``fullgrad.single_pass``), then the small SVD of ``B = Q^T G``. It never forms ``G``.
- ``dense``: form ``G`` (FP32) and ``torch.linalg.svd`` it (the ``fullgrad.mode=exact`` path).
  On one core of the 2-core VM the whole default sweep takes about 2.5 minutes, 90 s of it the
  4096 x 14336 SVD; ``--exact-max-elems 16777216`` skips the dense SVD above 4096 x 4096 (the
  table then shows only the cost of forming ``G``).
- ``factored``: the exact SVD without ``G`` from its factors, valid because ``rank G <= T``: QR
  of ``grad_out^T`` and ``x^T`` and an SVD of the ``T x T`` core, in FP64. It is the reference
  every path is scored against (principal angles to the exact top-r left/right singular
  subspaces; energy of ``G`` captured by the path's rank-r pair ``||U^T G V||_F^2 / ||G||_F^2``
  against the optimum ``sum_{i<=r} sigma_i^2 / ||G||_F^2``).

Memory is what each path allocates, in two ways: the bytes of the tensors it creates (counted
from the shapes; for ``dense``: ``G`` and ``U, S, V^T``) and the measured peak of anonymous
resident memory above a baseline taken after ``x`` and ``grad_out`` exist (``VmHWM`` reset through
``/proc/self/clear_refs``; glibc serves allocations above 64 KiB by ``mmap`` so freed memory
leaves at once; this includes LAPACK's workspace).

    OMP_NUM_THREADS=1 python scripts/bench_sketch.py --json docs/figures/bench_sketch.json \\
        --plot docs/figures/bench_sketch.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from proc_memory import libc, peak_anon_bytes, reset_peak, status_kib
from torch import nn

from pesocli.fullgrad import FullGradConfig, estimate_full_gradients

SHAPES = [
    (96, 96),  # tiny q/o
    (768, 768),  # 100M q/o
    (2048, 768),  # 100M gate/up
    (1024, 4096),  # 8B k/v
    (4096, 4096),  # 8B q/o
    (14336, 4096),  # 8B gate/up
    (4096, 14336),  # 8B down
]


# ------------------------------------------------------------------------------------- memory


class PeakAnon:
    """Peak anonymous resident memory above the level at ``__enter__`` (see the module doc)."""

    def __enter__(self) -> PeakAnon:
        reset_peak()
        self.base = status_kib("RssAnon") * 1024
        self.bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = peak_anon_bytes() - self.base


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------- inputs


def activations(out: int, inp: int, tokens: int, latent: int, decay: float, noise: float, seed: int):
    """``x (T, in)``, ``grad_out (T, out)``: shared token latent, power-law weights, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    k = min(latent, out, inp, tokens)
    weights = torch.arange(1, k + 1, dtype=torch.float32).pow(-decay / 2)
    z = torch.randn(tokens, k, generator=gen) * weights
    x = z @ (torch.randn(k, inp, generator=gen) / math.sqrt(inp))
    g = z @ (torch.randn(k, out, generator=gen) / math.sqrt(out))
    x += noise * x.std() * torch.randn(tokens, inp, generator=gen)
    g += noise * g.std() * torch.randn(tokens, out, generator=gen)
    return x, g


def factored_svd(x: torch.Tensor, g: torch.Tensor, rank: int):
    """Exact top-r of ``G = g^T x`` from the factors (FP64); also ``||G||_F^2``."""
    q_g, r_g = torch.linalg.qr(g.double().T)  # g^T = Q_g R_g    (out, T)
    q_x, r_x = torch.linalg.qr(x.double().T)  # x^T = Q_x R_x    (in, T)
    u, s, vh = torch.linalg.svd(r_g @ r_x.T)  # G = Q_g (R_g R_x^T) Q_x^T
    return q_g @ u[:, :rank], s, q_x @ vh[:rank].T


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.rad2deg(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)))


def captured(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor, total: float) -> float:
    """``||U^T G V||_F^2 / ||G||_F^2`` with ``U^T G V = (g U)^T (x V)`` (``U``, ``V`` orthonormalised)."""
    qu, _ = torch.linalg.qr(u.double())
    qv, _ = torch.linalg.qr(v.double())
    core = (g.double() @ qu).T @ (x.double() @ qv)
    return float(core.pow(2).sum()) / total


# ------------------------------------------------------------------------------------- paths


def sketch_path(x: torch.Tensor, g: torch.Tensor, rank: int, config: FullGradConfig):
    """The production sketch on a stand-in layer; returns ``(U, S, V)``, seconds, tensor bytes."""
    out, inp = g.shape[1], x.shape[1]
    layer = SimpleNamespace(
        out_features=out, in_features=inp, probe=None, delta=nn.Module(), anchor=SimpleNamespace(up=x[:0, 0])
    )

    def run_pass() -> None:  # what AdaptedLinear's backward hook does with one micro-batch
        layer.probe.observe(x, g)

    start = time.process_time()
    estimate = estimate_full_gradients({"layer": layer}, run_pass, rank, config)["layer"]
    u, s, v = estimate.top_r(rank)
    seconds = time.process_time() - start
    k = min(rank + config.oversample, out, inp)
    tokens = x.shape[0]
    # test matrix, accumulator, the (T, k) product of one pass, Q, B, and the small SVD's outputs
    allocated = 4 * (inp * k + max(out, inp) * k + tokens * k + out * k + k * inp + k * k + out * k + k * inp)
    return (u, s, v), seconds, allocated


def dense_path(x: torch.Tensor, g: torch.Tensor, rank: int):
    start = time.process_time()
    dense = g.T @ x
    formed = time.process_time() - start
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    seconds = time.process_time() - start
    allocated = nbytes(dense, u, s, vh)
    return (u[:, :rank], s[:rank], vh[:rank].T), seconds, formed, allocated


def run_shape(out: int, inp: int, args: argparse.Namespace) -> list[dict]:
    x, g = activations(out, inp, args.tokens, args.latent, args.decay, args.noise, args.seed)
    rows = []
    with PeakAnon() as mem:
        start = time.process_time()
        ref_u, ref_s, ref_v = factored_svd(x, g, args.rank)
        ref_seconds = time.process_time() - start
    total = float(ref_s.pow(2).sum())
    optimum = float(ref_s[: args.rank].pow(2).sum()) / total
    tokens = x.shape[0]
    mo, mi = min(out, tokens), min(inp, tokens)  # QR factors of g^T (out, T) and x^T (in, T)
    rows.append(
        dict(
            path="factored (fp64, reference)",
            seconds=ref_seconds,
            allocated_bytes=8
            * (mo * (out + tokens) + mi * (inp + tokens) + 2 * mo * mi + (out + inp) * args.rank),
            peak_bytes=mem.bytes,
            angle_u=0.0,
            angle_v=0.0,
            captured=optimum,
        )
    )

    def score(u, v) -> dict:
        return dict(
            angle_u=float(principal_angles(u, ref_u).max()),
            angle_v=float(principal_angles(v, ref_v).max()),
            captured=captured(x, g, u, v, total),
        )

    for q in args.power_iters:
        config = FullGradConfig(oversample=args.oversample, power_iters=q, seed=args.seed)
        with PeakAnon() as mem:
            (u, _, v), seconds, allocated = sketch_path(x, g, args.rank, config)
        rows.append(
            dict(
                path=f"sketch q={q}",
                seconds=seconds,
                allocated_bytes=allocated,
                peak_bytes=mem.bytes,
                **score(u, v),
            )
        )
        del u, v
    g_bytes = out * inp * 4
    if args.exact_max_elems is None or out * inp <= args.exact_max_elems:
        with PeakAnon() as mem:
            (u, _, v), seconds, formed, allocated = dense_path(x, g, args.rank)
        rows.append(
            dict(
                path="dense (form G + svd)",
                seconds=seconds,
                form_seconds=formed,
                allocated_bytes=allocated,
                peak_bytes=mem.bytes,
                **score(u, v),
            )
        )
        del u, v
    else:
        with PeakAnon() as mem:
            start = time.process_time()
            dense = g.T @ x
            formed = time.process_time() - start
            del dense
        svd_out = 4 * (out * min(out, inp) + min(out, inp) + min(out, inp) * inp)
        rows.append(
            dict(
                path="dense: form G only (svd skipped)",
                seconds=None,
                form_seconds=formed,
                allocated_bytes=g_bytes + svd_out,
                peak_bytes=mem.bytes,
                angle_u=None,
                angle_v=None,
                captured=None,
            )
        )
    for row in rows:
        row.update(shape=[out, inp], tokens=tokens, rank=args.rank, G_bytes=g_bytes)
    return rows


# ------------------------------------------------------------------------------------- output


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = (
        f"{'shape':>13} {'path':<34} {'cpu s':>8} {'form G s':>8} {'tensors MiB':>11} {'peak MiB':>9} "
        f"{'max angle U':>11} {'max angle V':>11} {'energy':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(
            f"{shape:>13} {r['path']:<34} {_fmt(r['seconds'], '8.3f', 'skipped'):>8} "
            f"{_fmt(r.get('form_seconds'), '8.3f'):>8} {r['allocated_bytes'] / 2**20:>11.2f} "
            f"{r['peak_bytes'] / 2**20:>9.2f} {_fmt(r['angle_u'], '10.2f'):>11} "
            f"{_fmt(r['angle_v'], '10.2f'):>11} "
            f"{_fmt(r['captured'], '7.4f'):>7}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: s[0] * s[1])
    labels = [f"{o}x{i}" for o, i in shapes]
    paths = [p for p in dict.fromkeys(r["path"] for r in rows) if not p.startswith("dense: form")]
    colors = {p: f"C{i}" for i, p in enumerate(paths)}
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))

    def series(p: str, key, ax, **kwargs) -> None:
        by_shape = {tuple(r["shape"]): r for r in rows if r["path"] == p}
        points = [(i, key(by_shape[s])) for i, s in enumerate(shapes) if s in by_shape]
        points = [(i, v) for i, v in points if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", color=colors[p], label=p, **kwargs)

    for p in paths:
        series(p, lambda r: r["seconds"], axes[0])
        series(p, lambda r: r["allocated_bytes"] / 2**20, axes[1])
        if not p.startswith("factored"):
            series(p, lambda r: None if r["angle_u"] is None else max(r["angle_u"], r["angle_v"]), axes[2])
            optimum = {tuple(r["shape"]): r["captured"] for r in rows if r["path"].startswith("factored")}
            series(
                p,
                lambda r, o=optimum: (
                    None
                    if r["captured"] is None
                    else max(100 * (o[tuple(r["shape"])] - r["captured"]) / o[tuple(r["shape"])], 1e-6)
                ),
                axes[3],
            )
    skipped = [r for r in rows if r["path"].startswith("dense: form")]
    if skipped:
        xs = [shapes.index(tuple(r["shape"])) for r in skipped]
        axes[1].plot(
            xs, [r["allocated_bytes"] / 2**20 for r in skipped], "x", color="k", label="dense, svd skipped"
        )
    for ax, ylabel, ttl, log in zip(
        axes,
        (
            "CPU seconds (1 thread)",
            "MiB of tensors allocated",
            "largest principal angle to exact top-r (deg)",
            "energy lost vs exact top-r (% of optimum)",
        ),
        ("time (per layer, without the model passes)", "memory", "subspace accuracy", "captured energy"),
        (True, True, False, True),
        strict=True,
    ):
        ax.set_xticks(range(len(shapes)), labels, rotation=30, fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(ttl, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_shape(text: str) -> tuple[int, int]:
    out, _, inp = text.lower().partition("x")
    return int(out), int(inp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", type=parse_shape, default=SHAPES, help="OUTxIN, e.g. 4096x14336"
    )
    parser.add_argument("--tokens", type=int, default=1024, help="tokens T behind G (a restart micro-batch)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--oversample", type=int, default=FullGradConfig().oversample)
    parser.add_argument("--power-iters", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--latent", type=int, default=64, help="directions of the power-law part of G")
    parser.add_argument("--decay", type=float, default=1.0, help="sigma_i ~ i^-decay")
    parser.add_argument("--noise", type=float, default=0.1, help="noise std relative to the activations' std")
    parser.add_argument(
        "--exact-max-elems",
        type=int,
        default=None,
        help="run the dense SVD only up to this many entries of G (default: every shape)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    lib = libc()
    if lib is not None:
        lib.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed tensors leave the resident set
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    started = time.time()
    for out, inp in args.shapes:
        shape_rows = run_shape(out, inp, args)
        rows.extend(shape_rows)
        print(table(shape_rows).split("\n", 2)[-1], flush=True)
    header = (
        f"T={args.tokens} tokens, r={args.rank}, p={args.oversample}, spectrum i^-{args.decay} over "
        f"{args.latent} directions + noise {args.noise}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {time.time() - started:.0f} s"
    )
    text = table(rows)
    print()
    print(header)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "header": header, "table": text, "rows": rows}, indent=1, default=str
            )
        )
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, header)


if __name__ == "__main__":
    main()
