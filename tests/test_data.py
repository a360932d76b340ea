"""Data loading, validation, tokenization with masking, packing, splitting and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pesocli.data import (
    IGNORE,
    DataConfig,
    Encoder,
    Example,
    Record,
    batches,
    build_datasets,
    load_prompt_template,
    load_records,
    num_batches,
    pack,
    render_chat,
    render_example,
)
from pesocli.errors import ConfigError, DataError
from pesocli.paths import default_eval_data, default_train_data, templates_dir, tiny_tokenizer_dir

ALPACA = {
    "instruction": "Tom has 3 apples and buys 5 more. How many apples?",
    "input": "",
    "output": "3 + 5 = 8\n#### 8",
}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6"},
    ]
}


def _load_tokenizer():
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


@pytest.fixture(scope="module")
def tok():
    return _load_tokenizer()


@pytest.fixture(scope="module")
def shipped(tok):
    return build_datasets(DataConfig(max_length=128), tok, seed=0)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_ids(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


# --- the shipped tokenizer and data -------------------------------------------------------------


def test_tiny_tokenizer(tok):
    assert 300 <= len(tok) <= 600
    ids = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert ids == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [4, 5, 6]
    text = "Any ASCII ~ text {x} [1, 2] \t\n$%^&*"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    rendered = tok.apply_chat_template(CHAT["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"


def test_shipped_data_fits_and_has_no_unk(tok, shipped):
    assert shipped.stats.format == "alpaca" and shipped.stats.path == str(default_train_data())
    assert shipped.stats.records == 1500 and shipped.stats.truncated == 0 and shipped.stats.dropped == 0
    assert all(len(ex) <= 64 for ex in shipped.train)
    assert all(tok.unk_token_id not in ex.input_ids for ex in shipped.train)
    evals, _ = load_records(default_eval_data())
    train, _ = load_records(default_train_data())
    assert len(evals) == 200
    assert not {r.data["instruction"] for r in train} & {r.data["instruction"] for r in evals}
    answer = train[0].data["output"].split("#### ")[-1]
    assert train[0].data["output"].split("\n")[0].endswith(f"= {answer}")


# --- formats and loading ------------------------------------------------------------------------


def test_text_jsonl(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "two words"}])
    bundle = build_datasets(DataConfig(path=str(path)), tok, seed=0)
    assert bundle.stats.format == "text" and bundle.stats.records == 2
    ex = bundle.train[0]
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE
    assert ex.labels[1:] == ex.input_ids[1:] and ex.input_ids[-1] == tok.eos_token_id
    assert ex.source == f"{path}:1"


def test_alpaca_json_array(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ALPACA, {**ALPACA, "input": "Be quick."}]))
    bundle = build_datasets(DataConfig(path=str(path)), tok, seed=0)
    assert bundle.stats.format == "alpaca" and bundle.train[0].source == f"{path}:[0]"
    assert "### Input:\nBe quick." in tok.decode(bundle.train[1].input_ids)


def test_json_file_with_json_lines(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, ALPACA])
    records, fmt = load_records(path)
    assert fmt == "alpaca" and [r.where for r in records] == [f"{path}:1", f"{path}:2"]


def test_messages_folder_sorted(tmp_path, tok):
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [CHAT])
    (folder / "a.json").write_text(json.dumps([CHAT, CHAT]))
    (folder / "notes.txt").write_text("ignored")
    records, fmt = load_records(folder)
    assert fmt == "messages"
    a, b = folder / "a.json", folder / "b.jsonl"
    assert [r.where for r in records] == [f"{a}:[0]", f"{a}:[1]", f"{b}:1"]
    assert len(build_datasets(DataConfig(path=str(folder)), tok, seed=0).train) == 3


def test_format_override(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{**ALPACA, "text": "raw text"}])
    assert build_datasets(DataConfig(path=str(path)), tok, 0).stats.format == "text"
    bundle = build_datasets(DataConfig(path=str(path), format="alpaca"), tok, 0)
    assert bundle.stats.format == "alpaca"
    assert tok.decode(trained_ids(bundle.train[0])) == ALPACA["output"] + "<|eos|>"
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing key 'messages' \(messages format\)"):
        build_datasets(DataConfig(path=str(path), format="messages"), tok, 0)


def test_limit(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"record {i}"} for i in range(10)])
    assert build_datasets(DataConfig(path=str(path), limit=3), tok, 0).stats.records == 3


# --- errors: every message starts with file:line --------------------------------------------------

BAD_JSONL = [
    ('{"text": "ok"}\n{"text": oops}\n', r":2: invalid JSON"),
    ('{"text": "ok"}\n\n[1, 2]\n', r":3: expected a JSON object, got an array"),
    ('{"text": 5}\n', r":1: 'text' must be a string \(got a number\) \(text format\)"),
    ('{"text": "ok"}\n{"text": "  "}\n', r":2: empty 'text'"),
    ('{"text": "ok"}\n{"instruction": "x", "output": "y"}\n', r":2: missing key 'text'"),
    (json.dumps(ALPACA) + '\n{"instruction": "x"}\n', r":2: missing key 'output' \(alpaca format\)"),
    (json.dumps(ALPACA) + '\n{"instruction": "x", "output": "y", "input": 3}\n', r":2: 'input' must be"),
    (json.dumps(ALPACA) + '\n{"instruction": "x", "output": ""}\n', r":2: empty 'output'"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', r":1: messages\[0\]: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": 1}]}\n', r":1: messages\[0\]: 'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r":1: no assistant message"),
    ('{"messages": []}\n', r":1: empty 'messages'"),
    ('{"question": "x", "answer": "y"}\n', r":1: cannot detect the data format"),
    ("", r": empty file"),
]


@pytest.mark.parametrize(("content", "message"), BAD_JSONL)
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"text": "a"}, {"text": ""}]', r"\.json:\[1\]: empty 'text'"),
        ('[{"text": "a"}, "b"]', r"\.json:\[1\]: expected a JSON object, got a string"),
        ('[\n {"text": "a"},\n {"text": }\n]', r"\.json:3: invalid JSON"),
        ('{"data": []}', r"\.json:1: expected a JSON array of records"),
    ],
)
def test_bad_json(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"no \.jsonl or \.json files"):
        load_records(tmp_path)


def test_all_records_checked_before_tokenizing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA] * 5 + [{"instruction": "x", "output": 1}])
    # the tokenizer is never touched: a bad last record is reported before any encoding
    with pytest.raises(DataError, match=r":6: 'output' must be a string"):
        build_datasets(DataConfig(path=str(path)), tokenizer=object(), seed=0)


# --- masking --------------------------------------------------------------------------------------


def test_alpaca_masking(tok):
    template = load_prompt_template("alpaca")
    ex = Encoder(tok, "alpaca", template, mask_prompt=True)(Record("x:1", ALPACA))
    prompt_ids = tok.encode(template.render_prompt(ALPACA["instruction"]), add_special_tokens=False)
    n_prompt = 1 + len(prompt_ids)  # BOS + prompt
    assert ex.input_ids[1:n_prompt] == prompt_ids
    assert all(label == IGNORE for label in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    trained = trained_ids(ex)
    assert trained[-1] == tok.eos_token_id and tok.decode(trained[:-1]) == ALPACA["output"]

    unmasked = Encoder(tok, "alpaca", template, mask_prompt=False)(Record("x:1", ALPACA))
    assert unmasked.input_ids == ex.input_ids and unmasked.labels[1:] == unmasked.input_ids[1:]


def test_plain_template(tok):
    ex = Encoder(tok, "alpaca", load_prompt_template("plain"))(Record("x:1", ALPACA))
    assert tok.decode(ex.input_ids) == f"<|bos|>{ALPACA['instruction']}\n{ALPACA['output']}<|eos|>"


def test_messages_masking(tok):
    ex = Encoder(tok, "messages")(Record("x:1", CHAT))
    assert tok.decode(ex.input_ids) == render_chat(tok, CHAT["messages"])
    runs = [tok.decode(run) for run in ex.trained_runs()]
    assert runs == ["2 + 2 = 4<|eos|>", "3 + 3 = 6<|eos|>"]
    unmasked = Encoder(tok, "messages", mask_prompt=False)(Record("x:1", CHAT))
    assert unmasked.num_trained == len(unmasked) - 1  # all but BOS


def test_fallback_chat_template():
    bare = _load_tokenizer()
    with_template = render_chat(bare, CHAT["messages"])
    bare.chat_template = None
    assert render_chat(bare, CHAT["messages"]) == with_template
    assert (templates_dir() / "chat" / "simple.jinja").is_file()


def test_assistant_content_the_template_rewrites_is_reported():
    bare = _load_tokenizer()
    bare.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | replace(' ', '_') }}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"^x:7: the content of turn 2 \(assistant\) does not appear"):
        Encoder(bare, "messages")(Record("x:7", CHAT))
    unmasked = Encoder(bare, "messages", mask_prompt=False)(Record("x:7", CHAT))
    assert unmasked.num_trained == len(unmasked) - 1


# --- truncation, packing, val split -------------------------------------------------------------


def test_truncation_counts(tmp_path, tok):
    records = [{"text": "short"}, {"text": "a much longer text " * 10}, {"text": "another long one " * 10}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    bundle = build_datasets(DataConfig(path=str(path), max_length=16), tok, 0)
    assert bundle.stats.truncated == 2 and bundle.stats.dropped == 0
    assert all(len(ex) <= 16 for ex in bundle.train)


def test_records_with_nothing_trained_left_are_dropped(tmp_path, tok):
    long = {**ALPACA, "instruction": "a very long question " * 20}
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, long])
    bundle = build_datasets(DataConfig(path=str(path), max_length=48), tok, 0)
    assert (bundle.stats.truncated, bundle.stats.dropped, len(bundle.train)) == (1, 1, 1)
    write_jsonl(path, [long])
    with pytest.raises(DataError, match="no record has a trained token left"):
        build_datasets(DataConfig(path=str(path), max_length=48), tok, 0)


def test_packing(tok, shipped):
    examples = shipped.train[:50]
    blocks = pack(examples, 128)
    assert len(blocks) < len(examples) and all(len(b) <= 128 for b in blocks)
    assert [t for b in blocks for t in b.input_ids] == [t for e in examples for t in e.input_ids]
    assert [t for b in blocks for t in b.labels] == [t for e in examples for t in e.labels]
    bundle = build_datasets(DataConfig(packing=True, max_length=128, limit=50), tok, 0)
    assert bundle.stats.examples == len(blocks)
    assert bundle.stats.trained_tokens == sum(e.num_trained for e in examples)


def test_val_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"record {i}"} for i in range(20)])
    cfg = DataConfig(path=str(path), val_split=0.25)
    a, b, c = (build_datasets(cfg, tok, seed) for seed in (0, 0, 1))
    assert (len(a.train), len(a.val), a.stats.val_records) == (15, 5, 5)
    sources = lambda examples: [ex.source for ex in examples]  # noqa: E731
    assert sources(a.val) == sources(b.val) and sources(a.val) != sources(c.val)
    assert not set(sources(a.train)) & set(sources(a.val))
    with pytest.raises(DataError, match="leaves no train records"):
        build_datasets(DataConfig(path=str(path), val_split=0.99), tok, 0)


def test_val_path(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [ALPACA] * 4)
    val = write_jsonl(tmp_path / "val.jsonl", [ALPACA] * 2)
    bundle = build_datasets(DataConfig(path=str(train), val_path=str(val)), tok, 0)
    assert len(bundle.train) == 4 and len(bundle.val) == 2 and bundle.val[0].source == f"{val}:1"
    assert build_datasets(DataConfig(path=str(train)), tok, 0).val is None


# --- batching -------------------------------------------------------------------------------------


def test_batches_deterministic_and_complete(shipped):
    examples = shipped.train[:10]
    first = list(batches(examples, 4, seed=3, epoch=0, pad_token_id=shipped.pad_token_id))
    again = list(batches(examples, 4, seed=3, epoch=0, pad_token_id=shipped.pad_token_id))
    other = list(batches(examples, 4, seed=3, epoch=1, pad_token_id=shipped.pad_token_id))
    assert len(first) == num_batches(10, 4) == 3 and first[-1]["input_ids"].shape[0] == 2
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, again, strict=True) for k in x)
    assert not all(torch.equal(x["labels"], y["labels"]) for x, y in zip(first, other, strict=True))
    rows = [(row, mask) for b in first for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    seen = sorted(tuple(row[mask.bool()].tolist()) for row, mask in rows)
    assert seen == sorted(tuple(ex.input_ids) for ex in examples)


def test_batch_padding(tok):
    examples = [Example([1, 10, 11], [IGNORE, 10, 11]), Example([1, 12], [IGNORE, 12])]
    (batch,) = batches(examples, 2, seed=0, epoch=0, pad_token_id=tok.pad_token_id, shuffle=False)
    assert batch["input_ids"].tolist() == [[1, 10, 11], [1, 12, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[IGNORE, 10, 11], [IGNORE, 12, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].dtype == torch.long
    assert tok.pad_token_id != tok.eos_token_id


# --- config, templates, rendering ----------------------------------------------------------------


def test_config_validate():
    assert DataConfig().validate() == []
    errors = DataConfig(format="csv", template="nope", max_length=0, val_split=1.5, limit=0).validate()
    assert len(errors) == 5 and "data.max_length must be >= 8 (got 0)" in errors
    assert DataConfig(val_split=0.1, val_path="v.jsonl").validate() == [
        "data.val_split must be 0 when data.val_path is set (they are exclusive)"
    ]


def test_prompt_templates(tmp_path):
    rendered = load_prompt_template("alpaca").render_prompt("Q", "I")
    assert rendered == "### Instruction:\nQ\n\n### Input:\nI\n\n### Response:\n"
    with pytest.raises(ConfigError, match="unknown prompt template 'nope'"):
        load_prompt_template("nope")
    bad = tmp_path / "bad.json"
    fields = {"prompt": "{question}", "prompt_with_input": "{instruction}{input}", "response": "{output}"}
    bad.write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match="prompt must use exactly the fields"):
        load_prompt_template(str(bad))


def test_render_example(tok):
    ex = Encoder(tok, "alpaca", load_prompt_template("alpaca"))(Record("x:1", ALPACA))
    text = render_example(ex, tok)
    green = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "green")
    assert green == ALPACA["output"] + "<|eos|>"
    assert text.plain == tok.decode(ex.input_ids)
