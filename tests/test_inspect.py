"""``peso restart-inspect``: the per-restart table, JSON, layer drill-down, PNGs, runs still being written.

One short ``peso-r`` run (40 steps, restarts before steps 1/11/21/31 counted from 1 as everywhere, loss
logged every step) is trained once for the module; the other cases are synthetic ``restarts.jsonl`` files
(one of them in the old 0-based version).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pesocli.cli import main
from pesocli.inspect import PLOT_FILES, read_run_log, summarize


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, train_embedded) -> Path:
    out = tmp_path_factory.mktemp("inspect-runs")
    overrides = {
        "train.max_steps": 40,
        "method.restart_every": 10,
        "train.log_every": 1,
        "train.eval_every": 20,
    }
    return train_embedded(out, overrides, "peso-r").run_dir


def _inspect(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["restart-inspect", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_table_lists_every_restart(run_dir: Path) -> None:
    output = _inspect([str(run_dir)])
    assert "peso-r, finished, 14 layers, 4 events" in output
    for header in ("energy", "σ1", "angle°", "anchor", "seconds", "loss", "+10"):
        assert header in output
    rows = [
        line.split() for line in output.splitlines() if line.split()[:1] in (["1"], ["11"], ["21"], ["31"])
    ]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "init", "14"),
        ("11", "restart", "14"),
        ("21", "restart", "14"),
        ("31", "restart", "14"),
    ]


def test_json_summary(run_dir: Path) -> None:
    doc = json.loads(_inspect([str(run_dir), "--json"]))
    assert doc["method"] == "peso-r" and doc["complete"] and doc["layers"] == 14
    events = doc["restarts"]
    assert [e["step"] for e in events] == [1, 11, 21, 31]
    assert [e["kind"] for e in events] == ["init", "restart", "restart", "restart"]
    metrics = {
        m["step"]: m["loss"]
        for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in m
    }
    for e in events:
        assert e["layers"] == 14 and not e["partial"]
        assert 0 < e["energy_min"] <= e["energy_median"] <= 1 + 1e-6
        assert 0 < e["sigma1_median"] <= e["sigma1_max"]
        assert e["seconds"] > 0
        assert e["loss_after_step"] == e["step"] + 9 and e["loss_after"] == metrics[e["step"] + 9]
        if e["step"] == 1:
            assert e["loss_before"] is None and e["angle_median"] is None
        else:
            assert e["loss_before"] == metrics[e["step"] - 1]
            assert 0 <= e["angle_median"] <= e["angle_max"] <= 90
    ranks = [e["anchor_rank_max"] for e in events]
    assert ranks[0] == 0 and ranks[1] > 0 and ranks == sorted(ranks)


def test_layer_drill_down(run_dir: Path) -> None:
    doc = json.loads(_inspect([str(run_dir), "--json", "--layer", "q_proj"]))
    records = doc["layer_records"]
    assert sorted(records) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all([r["step"] for r in rs] == [1, 11, 21, 31] for rs in records.values())
    assert len(records["model.layers.0.self_attn.q_proj"][0]["top_singular_values"]) == 8
    glob = json.loads(_inspect([str(run_dir), "--json", "--layer", "*.layers.1.mlp.*"]))["layer_records"]
    assert sorted(n.rsplit(".", 1)[1] for n in glob) == ["down_proj", "gate_proj", "up_proj"]
    table = _inspect([str(run_dir), "--layer", "layers.0.self_attn.v_proj"])
    assert "model.layers.0.self_attn.v_proj" in table and "top 4 σ" in table
    result = CliRunner().invoke(main, ["restart-inspect", str(run_dir), "--layer", "no_such_proj"])
    assert result.exit_code == 1 and result.output.startswith(
        "error: --layer 'no_such_proj' matches no layer"
    )


def test_plots_are_written(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = json.loads(_inspect([str(run_dir), "--json", "--plot", str(tmp_path / "plots")]))
    assert sorted(Path(p).name for p in doc["plots"]) == sorted(PLOT_FILES)
    for name in PLOT_FILES:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_missing_matplotlib_is_one_line(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    result = CliRunner().invoke(main, ["restart-inspect", str(run_dir), "--plot", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        result.output == "error: --plot needs matplotlib, which is not installed: pip install 'peso[plot]'\n"
    )


def test_run_still_being_written(run_dir: Path, tmp_path: Path) -> None:
    """No final/, the last restart event half written, its last line cut mid-record."""
    live = tmp_path / "live"
    shutil.copytree(run_dir, live, ignore=shutil.ignore_patterns("final", "summary.json"))
    lines = (live / "restarts.jsonl").read_text().splitlines(keepends=True)
    kept = lines[: 3 * 14 + 5]  # events 1/11/21 complete, 5 layers of event 31
    (live / "restarts.jsonl").write_text("".join(kept) + lines[3 * 14 + 5][:40])
    metrics = (live / "metrics.jsonl").read_text()
    (live / "metrics.jsonl").write_text(metrics[: metrics.index('{"step": 34')] + '{"step": 34, "lo')
    doc = json.loads(_inspect([str(live), "--json"]))
    assert not doc["complete"] and doc["skipped_partial_lines"] == 2
    last = doc["restarts"][-1]
    assert last["step"] == 31 and last["layers"] == 5 and last["partial"]
    assert last["loss_after"] is None  # step 40 is not logged yet
    assert "in progress" in _inspect([str(live)]) and "(partial)" in _inspect([str(live)])


def test_other_methods_and_runs_without_restarts(tmp_path: Path) -> None:
    """Any method's ``RestartRecord`` lines summarise (a GaLore-style subspace event, no anchor), also
    from an older run folder whose records have no ``version`` and count steps from 0."""
    run = tmp_path / "galore"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: galore\n")
    events = [
        {
            "step": s,
            "layer": f"model.layers.0.{p}",
            "method": "galore",
            "kind": "subspace",
            "rank": 4,
            "top_singular_values": [2.0 / (i + 1) for i in range(4)],
            "captured_energy": 0.5 + 0.1 * i,
            "principal_angle_deg": None if s == 0 else 30.0 + i,
            "anchor_rank": 0,
            "seconds": 0.01,
            "extra": {},
        }
        for s in (0, 50)
        for i, p in enumerate(("q_proj", "v_proj"))
    ]
    (run / "restarts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - s / 100}) + "\n" for s in range(1, 61))
    )
    summaries = summarize(read_run_log(run))
    # read 1-based: the old step 50 ran before the 51st step, after metrics step 50
    assert [(s.step, s.kind, s.layers) for s in summaries] == [(1, "subspace", 2), (51, "subspace", 2)]
    assert summaries[1].energy_min == pytest.approx(0.5) and summaries[1].angle_max == pytest.approx(31.0)
    assert summaries[1].seconds == pytest.approx(0.02)  # no seconds_total: the layers' sum
    assert summaries[1].loss_before == pytest.approx(2.5) and summaries[1].loss_after == pytest.approx(2.4)

    (run / "restarts.jsonl").write_text("")
    assert "no restart or subspace events" in _inspect([str(run)])


def test_not_a_run_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["restart-inspect", str(tmp_path)])
    assert result.exit_code == 2  # a usage error, as in every command (README: exit codes)
    assert (
        result.output == f"error: {tmp_path} is not a peso run folder (no config.yaml, metrics.jsonl or "
        "restarts.jsonl)\n"
    )


def test_restart_inspect_help() -> None:
    result = CliRunner().invoke(main, ["restart-inspect", "--help"])
    assert result.exit_code == 0
    for option in ("--layer", "--json", "--plot"):
        assert option in result.output
