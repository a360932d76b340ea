"""Record formats users bring (TRL prompt/completion, ShareGPT, OpenAI tool/name turns) and the
``--dry-run`` preview where colour does not show."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from pesocli.cli import main
from pesocli.data import (
    DataConfig,
    Encoder,
    Example,
    Record,
    build_datasets,
    detect_format,
    load_records,
)
from pesocli.data.records import RECORD_FORMATS
from pesocli.data.render import example_preview, render_example
from pesocli.errors import DataError
from pesocli.models import load_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_text(tok, example: Example) -> list[str]:
    """Each run of trained tokens, decoded."""
    return [tok.decode(run) for run in example.trained_runs()]


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2 + 2?"},
        {"from": "gpt", "value": "4"},
        {"from": "human", "value": "And 3 + 3?"},
        {"from": "gpt", "value": "6"},
    ]
}


def test_sharegpt_trains_the_gpt_turns(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, SHAREGPT])
    bundle = build_datasets(DataConfig(path=str(path)), tok, seed=0)
    assert bundle.stats.format == "sharegpt" and bundle.stats.records == 2
    assert trained_text(tok, bundle.train[0]) == ["4<|eos|>", "6<|eos|>"]
    text = tok.decode(bundle.train[0].input_ids)
    assert text.startswith("<|bos|><|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n4")


def test_prompt_completion_strings_and_turns(tmp_path, tok):
    plain = {"prompt": "Q: What is 2 + 2?\nA:", "completion": " 4"}
    path = write_jsonl(tmp_path / "d.jsonl", [plain])
    bundle = build_datasets(DataConfig(path=str(path)), tok, seed=0)
    assert bundle.stats.format == "prompt-completion"
    assert trained_text(tok, bundle.train[0]) == [" 4<|eos|>"]
    assert tok.decode(bundle.train[0].input_ids) == "<|bos|>Q: What is 2 + 2?\nA: 4<|eos|>"
    unmasked = build_datasets(DataConfig(path=str(path), mask_prompt=False), tok, seed=0).train[0]
    assert unmasked.num_trained == len(unmasked) - 1  # all but BOS

    turns = {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "2 + 2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    example = Encoder(tok, "prompt-completion")(Record("x:1", turns))
    assert trained_text(tok, example) == ["4<|eos|>"]  # the prompt's assistant turn is context


TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% else %}{{ m['content'] }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
)

OPENAI = {
    "messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "X"}'}}]},
        {"role": "tool", "content": "18 C, sunny", "name": "weather", "tool_call_id": "1"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ]
}


def test_openai_messages_with_name_and_tool_turns(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI])
    records, fmt = load_records(path)
    assert fmt == "messages"
    tok_with_tools = load_tiny_tokenizer()
    tok_with_tools.chat_template = TOOL_TEMPLATE
    example = Encoder(tok_with_tools, fmt)(records[0])
    assert trained_text(tok, example) == ["It is 18 C and sunny in Paris.<|eos|>"]
    assert "18 C, sunny" in tok.decode(example.input_ids)  # the tool's answer is context, not trained


BAD = [
    ('{"conversations": [{"from": "bot", "value": "hi"}]}', r":1: conversations\[0\]: unknown 'from' 'bot'"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}', r":1: no 'gpt' turn"),
    ('{"conversations": [{"from": "gpt", "value": 3}]}', r":1: conversations\[0\]: 'value' must be a string"),
    ('{"conversations": "hi"}', r":1: 'conversations' must be a list"),
    ('{"prompt": "x", "completion": ""}', r":1: empty 'completion' \(prompt-completion format\)"),
    ('{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}',
     r":1: 'prompt' and 'completion' must be two strings or two lists of turns \(got a string and an array"),
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]}',
     r":1: no assistant message in 'completion'"),
    ('{"messages": [{"role": "user", "content": "x", "name": 3}, {"role": "assistant", "content": "y"}]}',
     r":1: messages\[0\]: 'name' must be a string"),
    ('{"messages": [{"role": "function", "content": "x"}]}', r":1: messages\[0\]: unknown role 'function'"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:1: ") and "\n" not in str(info.value)


def test_format_is_detected_from_the_first_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, {"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing key 'conversations' \(sharegpt format\)"):
        load_records(path)
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing key 'prompt' \(prompt-completion format\)"):
        load_records(path, "prompt-completion")


def test_detect_format_reads_every_record_format_by_default():
    record = Record("d.jsonl:1", SHAREGPT)
    assert detect_format(record) == detect_format(record, RECORD_FORMATS) == "sharegpt"
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot detect the data format .* or 'messages' \("):
        detect_format(record, ("text", "alpaca", "messages"))


# --- the --dry-run preview -------------------------------------------------------------------------


def test_preview_marks_masked_runs_and_counts_tokens(tok):
    example = Encoder(tok, "sharegpt")(Record("d.jsonl:1", SHAREGPT))
    heading, body = example_preview(example, tok, markers=True)
    assert body.plain == (
        "[masked]<|bos|><|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n[/masked]4<|eos|>"
        "[masked]<|user|>\nAnd 3 + 3?\n<|assistant|>\n[/masked]6<|eos|>"
    )
    assert not body.spans
    assert f"d.jsonl:1; {example.num_trained} / {len(example)} tokens trained" in heading.plain
    assert example.num_trained == 4 and 0 < example.num_trained < len(example)
    styled = render_example(example, tok)
    assert styled.plain == tok.decode(example.input_ids) and "[masked]" not in styled.plain


def test_print_dry_run_colour_only_on_a_terminal(tok, tmp_path):
    from pesocli.config import load_config
    from pesocli.train.loop import print_dry_run
    from pesocli.train.progress import Reporter

    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    cfg = load_config(None, {"data.path": str(path)})
    bundle = build_datasets(cfg.data, tok, seed=0)
    outputs = {}
    consoles = {"terminal": {"force_terminal": True}, "no-color": {"force_terminal": True, "no_color": True},
                "pipe": {}}
    for name, kwargs in consoles.items():
        out = io.StringIO()
        console = Console(file=out, width=60, **kwargs)
        print_dry_run(cfg, bundle, tok, Reporter(1, quiet=True, console=console))
        outputs[name] = out.getvalue()
    assert "\x1b[" in outputs["terminal"] and "[masked]" not in outputs["terminal"]
    for name in ("no-color", "pipe"):
        assert "[masked]<|user|>\nAnd 3 + 3?\n<|assistant|>\n[/masked]6<|eos|>" in outputs[name]
        assert "4 / " in outputs[name] and "tokens trained" in outputs[name]
    assert "\x1b[" not in outputs["pipe"]


def test_cli_dry_run_preview_reads_when_piped(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    data = write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT])
    for extra in ([], ["--no-color"]):
        args = ["train", "--dry-run", "--data", str(data), "--val-split", "0", *extra,
                "--output-dir", str(tmp_path / "runs")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "sharegpt records" in result.output
        assert "[masked]<|user|>\nAnd 3 + 3?\n<|assistant|>\n[/masked]6<|eos|>" in result.output
        assert " / " in result.output and "tokens trained" in result.output
    assert not (tmp_path / "runs").exists()
