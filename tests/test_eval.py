"""``peso eval``: answers, the three metrics, every target kind giving the same numbers, one-line errors.

One short ``peso-r`` run (120 steps, restarts at 0/40/80, a checkpoint at 60) is trained once for
the module; every eval uses ``--limit`` so the file stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pesocli.cli import main
from pesocli.evaluate import answers_match, extract_answer, normalize_answer
from pesocli.paths import default_eval_data

LIMIT = 40
FAST = ["--limit", str(LIMIT), "--max-new-tokens", "20", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, train_embedded) -> Path:
    out = tmp_path_factory.mktemp("eval-runs")
    overrides = {"train.max_steps": 120, "method.restart_every": 40, "checkpoint.every": 60}
    return train_embedded(out, overrides, "peso-r").run_dir


def _eval(args: list[str]) -> dict:
    result = CliRunner().invoke(main, ["eval", *args])
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "eval.json").read_text())


def _values(doc: dict) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in doc["results"]}


def _predictions(out: Path, metric: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return [p for p in lines if p["metric"] == metric]


# --- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("5 - 1 = 4\n#### 4", "4"),
        ("#### 1,234.50", "1234.5"),
        ("so the total is $18.", "18"),
        ("#### 4.0\n### Instruction: 7", "4"),
        ("first 3 then 12 apples", "12"),
        ("#### -0", "0"),
        ("#### 72 apples", "72"),
        ("The answer is Paris.", "the answer is paris"),
        ("", ""),
    ],
)
def test_extract_answer(text: str, answer: str) -> None:
    assert extract_answer(text) == answer


def test_answers_match_and_normaliser() -> None:
    assert answers_match("2 * 2 = 4\n#### 4", "#### 4.00")
    assert not answers_match("#### 5", "#### 4")
    assert not answers_match("", "")  # nothing predicted is never right
    assert normalize_answer("  $1,000 ") == "1000"


# --- a run, its checkpoint and its exports ----------------------------------------------------


def test_eval_of_a_run_reports_exact_match_and_perplexity(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    doc = _eval([str(run_dir), "--out", str(out), *FAST])
    values = _values(doc)
    assert set(values) == {"exact-match", "perplexity"}
    assert 0.0 <= values["exact-match"] <= 1.0
    assert 1.0 < values["perplexity"] < 50.0
    assert all(r["n"] == LIMIT for r in doc["results"])
    assert doc["target"]["kind"] == "run" and doc["target"]["step"] == 120
    assert doc["target"]["hash"].startswith("sha256:") and len(doc["target"]["hash"]) == 71
    assert doc["config"]["metrics"] == ["exact-match", "perplexity"] and doc["config"]["limit"] == LIMIT
    generated = _predictions(out, "exact-match")
    assert len(generated) == LIMIT
    assert {"prompt", "reference", "prediction", "correct"} <= set(generated[0])
    assert sum(p["correct"] for p in generated) == round(values["exact-match"] * LIMIT)


def test_perplexity_is_exp_of_the_training_eval_loss(run_dir: Path, tmp_path: Path) -> None:
    """Same encoding, masking and shift as ``peso train``'s eval loss on the same records."""
    from pesocli.data import DataConfig, build_datasets
    from pesocli.runs import load_run
    from pesocli.train.loop import evaluate

    data = tmp_path / "few.jsonl"
    data.write_text("".join(default_eval_data().read_text().splitlines(keepends=True)[:24]))
    doc = _eval(
        [
            str(run_dir),
            "--data",
            str(data),
            "--metric",
            "perplexity",
            "--out",
            str(tmp_path / "ev"),
            "--quiet",
        ]
    )
    run = load_run(run_dir)
    bundle = build_datasets(DataConfig(path=str(data), val_path=str(data)), run.tokenizer, seed=0)
    loss = evaluate(run.model, bundle, batch_size=5, device=torch.device("cpu"))
    assert _values(doc)["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_checkpoint_target(run_dir: Path, tmp_path: Path) -> None:
    doc = _eval(
        [str(run_dir), "--checkpoint", "60", "--metric", "perplexity", "--out", str(tmp_path / "ev"), *FAST]
    )
    assert doc["target"]["step"] == 60 and doc["target"]["checkpoint"] == 60
    final = _eval([str(run_dir), "--metric", "perplexity", "--out", str(tmp_path / "ev2"), *FAST])
    assert doc["target"]["hash"] != final["target"]["hash"]
    assert _values(doc)["perplexity"] != _values(final)["perplexity"]


def test_exports_give_the_numbers_of_the_run(run_dir: Path, tmp_path: Path) -> None:
    """anchored (model + PEFT adapter, unmerged), merged (dense) and adapter (on the base) exports."""
    pytest.importorskip("pesocli.export", reason="pesocli.export ([export]) has not landed")
    runner = CliRunner()
    docs, generated = {}, {}
    for fmt in ("anchored", "merged", "adapter"):
        folder = tmp_path / fmt
        result = runner.invoke(
            main, ["export", str(run_dir), "--format", fmt, "--out", str(folder), "--dtype", "fp32"]
        )
        assert result.exit_code == 0, result.output
        docs[fmt] = _eval([str(folder), "--out", str(tmp_path / f"ev-{fmt}"), *FAST])
        generated[fmt] = [p["prediction"] for p in _predictions(tmp_path / f"ev-{fmt}", "exact-match")]
    docs["run"] = _eval([str(run_dir), "--out", str(tmp_path / "ev-run"), *FAST])
    generated["run"] = [p["prediction"] for p in _predictions(tmp_path / "ev-run", "exact-match")]

    assert docs["anchored"]["target"]["kind"] == "anchored" and docs["merged"]["target"]["kind"] == "model"
    assert docs["adapter"]["target"]["kind"] == "adapter"
    reference = _values(docs["run"])
    for fmt in ("anchored", "merged", "adapter"):
        values = _values(docs[fmt])
        assert values["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-6), fmt
        assert values["exact-match"] == reference["exact-match"], fmt
        assert generated[fmt] == generated["run"], fmt
    assert _values(docs["anchored"])["perplexity"] == pytest.approx(
        _values(docs["merged"])["perplexity"], rel=1e-6
    )


# --- choice ------------------------------------------------------------------------------------


def test_choice_metric_matches_a_dense_log_likelihood(run_dir: Path, tmp_path: Path) -> None:
    records = [
        {"question": "What is 2 + 3?", "choices": ["4", "5", "6"], "answer": 1},
        {"question": "Ann has 4 pens and gets 4 more. How many pens?", "choices": ["8", "16"], "answer": "A"},
        {
            "question": "What is 9 - 3?",
            "input": "Answer with a number.",
            "choices": ["3", "6"],
            "answer": "6",
        },
    ]
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ev"
    doc = _eval([str(run_dir), "--data", str(data), "--out", str(out), "--quiet"])
    assert [r["metric"] for r in doc["results"]] == ["choice"] and doc["results"][0]["n"] == 3
    predictions = _predictions(out, "choice")
    assert [p["reference"] for p in predictions] == [1, 0, 1]

    # dense reference for the first record: log-softmax of the run's logits over the option tokens
    from pesocli.data.templates import load_prompt_template
    from pesocli.runs import load_run

    run = load_run(run_dir)
    tok, template = run.tokenizer, load_prompt_template("alpaca")
    context = [
        tok.bos_token_id,
        *tok.encode(template.render_prompt(records[0]["question"]), add_special_tokens=False),
    ]
    for choice, loglik in zip(records[0]["choices"], predictions[0]["logliks"], strict=True):
        option = tok.encode(template.render_response(choice), add_special_tokens=False)
        ids = torch.tensor([context + option])
        with torch.no_grad():
            logprobs = torch.log_softmax(run.model(ids).logits[0, :-1].double(), dim=-1)
        expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(option))
        assert loglik == pytest.approx(expected, abs=1e-4)
    assert predictions[0]["prediction"] == max(range(3), key=predictions[0]["logliks"].__getitem__)


# --- every training format ---------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _arith(n: int) -> list[dict]:
    lines = default_eval_data().read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _eval_both(run_dir: Path, tmp_path: Path, data: Path) -> tuple[dict, list[dict], list[dict]]:
    """eval.json, the exact-match predictions and the perplexity predictions of ``data``."""
    out = tmp_path / f"ev-{data.stem}"
    doc = _eval([str(run_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "12", "--quiet"])
    return doc, _predictions(out, "exact-match"), _predictions(out, "perplexity")


def _same_numbers(a: tuple[dict, list[dict], list[dict]], b: tuple[dict, list[dict], list[dict]]) -> None:
    (doc_a, gen_a, ppl_a), (doc_b, gen_b, ppl_b) = a, b
    assert len(gen_a) == len(ppl_a) == doc_a["results"][0]["n"] > 0
    assert [r["metric"] for r in doc_a["results"]] == ["exact-match", "perplexity"]
    assert _values(doc_a) == _values(doc_b)  # identical token ids, so identical floats
    assert [(p["tokens"], p["nll"]) for p in ppl_a] == [(p["tokens"], p["nll"]) for p in ppl_b]
    keys = ("prompt", "reference", "prediction", "correct")
    assert [[p[k] for k in keys] for p in gen_a] == [[p[k] for k in keys] for p in gen_b]


_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _messages(turns: list[tuple[str, str]]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _sharegpt(turns: list[tuple[str, str]]) -> dict:
    return {"conversations": [{"from": _SHAREGPT_FROM[role], "value": content} for role, content in turns]}


def test_sharegpt_and_conversational_prompt_completion_give_the_numbers_of_messages(
    run_dir: Path, tmp_path: Path
) -> None:
    """The same conversations as messages, sharegpt and TRL prompt/completion turns: same numbers."""
    convs = [[("user", r["instruction"]), ("assistant", r["output"])] for r in _arith(4)]
    convs.append([("system", "Answer briefly."), ("user", "What is 2 + 3?"), ("assistant", "#### 5")])
    messages = _write_jsonl(tmp_path / "messages.jsonl", [_messages(t) for t in convs])
    sharegpt = _write_jsonl(tmp_path / "sharegpt.jsonl", [_sharegpt(t) for t in convs])
    turns = [_messages(t)["messages"] for t in convs]
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": t[:-1], "completion": t[-1:]} for t in turns])
    reference = _eval_both(run_dir, tmp_path, messages)
    assert reference[0]["data"]["format"] == "messages" and reference[0]["results"][0]["n"] == len(convs)
    assert reference[1][0]["reference"] == convs[0][1][1]  # the last assistant turn is the target
    assert reference[1][0]["prompt"].endswith("<|assistant|>\n")  # the template's generation prompt
    for data, fmt in ((sharegpt, "sharegpt"), (pairs, "prompt-completion")):
        result = _eval_both(run_dir, tmp_path, data)
        assert result[0]["data"]["format"] == fmt
        _same_numbers(reference, result)

    # multi-turn: every assistant turn is scored (as trained), the last one is the exact-match target
    multi = [("user", "What is 1 + 1?"), ("assistant", "#### 2")]
    multi += [("user", "And 2 + 2?"), ("assistant", "#### 4")]
    a = _eval_both(run_dir, tmp_path, _write_jsonl(tmp_path / "multi_m.jsonl", [_messages(multi)]))
    b = _eval_both(run_dir, tmp_path, _write_jsonl(tmp_path / "multi_s.jsonl", [_sharegpt(multi)]))
    _same_numbers(a, b)
    assert a[1][0]["reference"] == "#### 4" and "And 2 + 2?" in a[1][0]["prompt"]


def test_string_prompt_completion_gives_the_numbers_of_alpaca(run_dir: Path, tmp_path: Path) -> None:
    """TRL's two strings, written as the alpaca template writes them: the same tokens, the same numbers."""
    from pesocli.data.templates import load_prompt_template

    template = load_prompt_template("alpaca")
    records = _arith(6)
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", records)
    pairs = _write_jsonl(
        tmp_path / "strings.jsonl",
        [
            {
                "prompt": template.render_prompt(r["instruction"], r.get("input") or ""),
                "completion": template.render_response(r["output"]),
            }
            for r in records
        ],
    )
    a, b = _eval_both(run_dir, tmp_path, alpaca), _eval_both(run_dir, tmp_path, pairs)
    assert b[0]["data"]["format"] == "prompt-completion"
    _same_numbers(a, b)
    assert 1.0 < _values(b[0])["perplexity"] < 50.0


def test_messages_with_tool_turns_score_only_the_assistant_turns(run_dir: Path, tmp_path: Path) -> None:
    """Tool turns and a tool-call-only assistant turn are context: perplexity = exp(training eval loss)."""
    from pesocli.data import DataConfig, build_datasets
    from pesocli.runs import load_run
    from pesocli.train.loop import evaluate

    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    records = [
        {
            "messages": [
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "add", "content": "5"},
                {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
            ]
        },
        _messages([("user", "What is 4 - 1?"), ("assistant", "#### 3")]),
    ]
    data = _write_jsonl(tmp_path / "tools.jsonl", records)
    doc, generated, scored = _eval_both(run_dir, tmp_path, data)
    assert generated[0]["reference"] == "2 + 3 = 5\n#### 5"
    assert generated[0]["prompt"].endswith("<|tool|>\n5\n<|assistant|>\n")
    run = load_run(run_dir)
    bundle = build_datasets(DataConfig(path=str(data), val_path=str(data)), run.tokenizer, seed=0)
    assert [p["tokens"] for p in scored] == [ex.num_trained for ex in bundle.val]
    eos = run.tokenizer.eos_token
    assert [run.tokenizer.decode(r) for r in bundle.val[0].trained_runs()] == [f"2 + 3 = 5\n#### 5{eos}"]
    loss = evaluate(run.model, bundle, batch_size=2, device=torch.device("cpu"))
    assert _values(doc)["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_eval_reads_every_training_format() -> None:
    """One list of formats: each has default metrics, and each default metric reads that format."""
    from pesocli.data.records import RECORD_FORMATS
    from pesocli.evaluate.config import DEFAULT_METRICS, EVAL_FORMATS
    from pesocli.evaluate.metrics import METRIC_FORMATS

    assert EVAL_FORMATS == ("auto", *RECORD_FORMATS, "choice")
    assert set(DEFAULT_METRICS) == set(EVAL_FORMATS) - {"auto"}
    for fmt, metrics in DEFAULT_METRICS.items():
        assert all(fmt in METRIC_FORMATS[metric][0] for metric in metrics), fmt


# --- one-line errors ---------------------------------------------------------------------------


def _error_line(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["eval", *args])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_targets_and_data_get_one_line_errors(run_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in _error_line([str(empty)])

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("final", "eval"))
    assert "no final/" in _error_line([str(unfinished)]) and "60" in _error_line([str(unfinished)])
    assert "no checkpoint at step 7" in _error_line([str(run_dir), "--checkpoint", "7"])

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "1 + 1 = 2"}) + "\n")
    assert "exact-match needs prompt/answer records" in _error_line(
        [str(run_dir), "--data", str(text), "--metric", "exact-match"]
    )
    assert "choice needs choice records" in _error_line([str(run_dir), "--metric", "choice"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    assert f"{broken}:2: invalid JSON" in _error_line([str(run_dir), "--data", str(broken)])
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"query": "a", "response": "b"}) + "\n")
    assert "cannot detect the data format" in _error_line([str(run_dir), "--data", str(unknown)])
    bad_sharegpt = tmp_path / "bad_sharegpt.jsonl"
    bad_sharegpt.write_text(json.dumps({"conversations": [{"from": "bot", "value": "b"}]}) + "\n")
    assert f"{bad_sharegpt}:1: conversations[0]: unknown 'from'" in _error_line(
        [str(run_dir), "--data", str(bad_sharegpt)]
    )
    bad_choice = tmp_path / "bad_choice.jsonl"
    bad_choice.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    assert f"{bad_choice}:1: 'answer' 5" in _error_line([str(run_dir), "--data", str(bad_choice)])
    assert "does not exist" in _error_line(["./no/such/folder"])


def test_missing_optional_backends_are_one_line_errors(run_dir: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert "--backend vllm needs vllm" in _error_line([str(run_dir), "--backend", "vllm"])
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert "--tasks needs lm-eval" in _error_line([str(run_dir), "--tasks", "gsm8k"])
    assert "pass one or the other" in _error_line(
        [str(run_dir), "--tasks", "gsm8k", "--metric", "perplexity"]
    )


def test_the_backend_is_closed_after_the_eval_and_after_a_failure(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_eval`` closes its backend (vLLM's engine process goes down then, not at interpreter exit,
    where vLLM 0.32's CPU build can abort after the results were written) on success and on error."""
    from pesocli.evaluate import runner

    closed: list[str] = []
    real_backend = runner._backend

    def closing_backend(target, cfg):
        backend, step, template = real_backend(target, cfg)
        backend.close = lambda: closed.append("closed")
        return backend, step, template

    monkeypatch.setattr(runner, "_backend", closing_backend)
    _eval([str(run_dir), "--metric", "perplexity", "--out", str(tmp_path / "ok"), *FAST])
    assert closed == ["closed"]

    def failing_measure(*args, **kwargs):
        raise RuntimeError("engine died")

    monkeypatch.setattr(runner, "_measure", failing_measure)
    with pytest.raises(RuntimeError, match="engine died"):
        CliRunner().invoke(main, ["eval", str(run_dir), "--out", str(tmp_path / "bad"), *FAST],
                           catch_exceptions=False)
    assert closed == ["closed", "closed"]
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_vllm_backend_close_shuts_the_engine_down_once() -> None:
    """``VLLMBackend.close`` calls the engine client's ``shutdown`` (which detaches vLLM's exit-time
    finalizer) once, however often it is called; no vLLM needed."""
    from types import SimpleNamespace

    from pesocli.evaluate.backends import VLLMBackend

    calls: list[str] = []
    backend = VLLMBackend.__new__(VLLMBackend)
    backend.llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(
        shutdown=lambda: calls.append("shutdown"))))
    backend.close()
    backend.close()
    assert calls == ["shutdown"] and backend.llm is None


def test_eval_help() -> None:
    result = CliRunner().invoke(main, ["eval", "--help"])
    assert result.exit_code == 0
    for option in (
        "--metric",
        "--checkpoint",
        "--max-new-tokens",
        "--limit",
        "--backend",
        "--tasks",
        "--out",
    ):
        assert option in result.output


def test_a_second_eval_keeps_the_first(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    args = [str(run_dir), "--metric", "perplexity", "--out", str(out), "--limit", "3", "--quiet"]
    first = CliRunner().invoke(main, ["eval", *args])
    assert first.exit_code == 0, first.output
    before = (out / "eval.json").read_text()
    second = CliRunner().invoke(main, ["eval", *args])
    assert second.exit_code == 0, second.output
    assert "holds an earlier eval, kept as it is" in " ".join(second.output.split())
    assert (out / "eval.json").read_text() == before
    assert json.loads((tmp_path / "ev-2" / "eval.json").read_text())["results"]
