"""Assistant-only loss under real chat template styles and tokenizer classes (offline).

Tokenizers are trained here on a small corpus with ``tokenizers`` (a byte-level BPE as Qwen/GPT-2
use, and a SentencePiece-style BPE with a ``Metaspace`` pre-tokenizer and byte fallback as
Llama 2 / Mistral use) and wrapped in the transformers classes real folders load. Templates are
written here as Jinja strings in the style of each family. Every case checks that the trained
tokens decode to exactly each assistant content (as the template writes it) plus its end-of-turn
marker, one run per assistant turn, and nothing of the user or system turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pesocli.data import DataConfig, Encoder, Example, Record, build_datasets, render_chat
from pesocli.errors import DataError

SPECIALS = [
    "<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>", "<|system|>",
    "<|user|>", "<|assistant|>", "<|end|>",
]

SINGLE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "3 + 3 = 6, so the answer is 6."},
]
SPACES = [
    {"role": "system", "content": "You answer in words."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "  Hello there.\n"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": " Hello again. "},
]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "spaces": SPACES}

CORPUS = [
    json.dumps(c) for c in CONVERSATIONS.values()
] + ["What is the answer? Hello there, how are you today? Be brief and say it in words again."] * 5


@dataclass(frozen=True)
class Style:
    """A chat template and what it writes around an assistant turn."""

    template: str
    end_of_turn: str
    trims: bool = False
    """The template writes ``content | trim``."""


CHATML = Style(
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "<|im_end|>",
)
LLAMA3 = Style(
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}",
    "<|eot_id|>",
    trims=True,
)
MISTRAL_V03 = Style(  # the system message goes into the LAST user turn
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if message == user_messages[-1] and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- endif %}{%- endfor %}",
    "</s>",
    trims=True,
)
GEMMA = Style(  # no system role (folded into the first user turn), "model" answers
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}",
    "<end_of_turn>",
    trims=True,
)
PHI3 = Style(  # eos_token once at the end of the conversation, after the last <|end|>
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
    "<|end|>",
)
ZEPHYR = Style(
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}{% elif message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}",
    "</s>",
)
STYLES = {
    "chatml": CHATML, "llama3": LLAMA3, "mistral-v0.3": MISTRAL_V03, "gemma": GEMMA, "phi3": PHI3,
    "zephyr": ZEPHYR,
}


def _trained(pre_tokenizer, train_pre_tokenizer, decoder, model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = train_pre_tokenizer
    tok.decoder = decoder
    alphabet = sorted(set("".join(CORPUS)) - {"\n"})  # newlines only through byte fallback (SentencePiece)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if pre_tokenizer is None else alphabet,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    return tok


def byte_level_tokenizer(cls_name: str = "Qwen2TokenizerFast"):
    """A byte-level BPE (GPT-2 / Qwen style) wrapped in ``cls_name``."""
    import transformers

    tok = _trained(None, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), models.BPE())
    cls = getattr(transformers, cls_name)
    return cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def sentencepiece_tokenizer(cls_name: str = "LlamaTokenizerFast"):
    """A SentencePiece-style BPE (Llama 2 / Mistral): ``▁`` for spaces, prepended once, byte fallback."""
    import transformers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    strip = decoders.Strip(content=" ", left=1)
    decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), strip])
    train_split = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    model = models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = _trained(metaspace, train_split, decoder, model)
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(raw))
    cls = getattr(transformers, cls_name)
    return cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


TOKENIZERS = {"byte-level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make() for name, make in TOKENIZERS.items()}


def decode(tokenizer, ids: list[int]) -> str:
    """``ids`` as text, exactly: decoded after BOS so a SentencePiece decoder keeps a leading space."""
    text = tokenizer.decode([tokenizer.bos_token_id, *ids], skip_special_tokens=False)
    return text[len(tokenizer.bos_token) :]


def assert_trains_assistant_turns(tokenizer, example: Example, messages: list[dict], style: Style) -> None:
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [(c.strip() if style.trims else c) + style.end_of_turn for c in contents]
    runs = [decode(tokenizer, run) for run in example.trained_runs()]
    # A token that straddles the start of a turn (the template's space or newline fused with the
    # content's first word or leading space: "Ġanswer", "ĊĠ") is trained; only such whitespace may
    # come before the content.
    runs = [want if run.endswith(want) and run[: len(run) - len(want)].isspace() else run
            for run, want in zip(runs, expected, strict=False)]
    assert runs == expected
    rendered, ids = render_chat(tokenizer, messages), example.input_ids
    if tokenizer.bos_token and not rendered.startswith(tokenizer.bos_token):  # the encoder added BOS
        assert ids[0] == tokenizer.bos_token_id
        ids = ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    for m in messages:  # nothing of the user or system turns is trained
        if m["role"] != "assistant":
            assert all(m["content"].strip() not in run for run in runs)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("style_name", STYLES)
def test_assistant_only_loss(tokenizers, style_name: str, tokenizer_name: str, conversation: str) -> None:
    tokenizer, style = tokenizers[tokenizer_name], STYLES[style_name]
    tokenizer.chat_template = style.template
    messages = CONVERSATIONS[conversation]
    example = Encoder(tokenizer, "messages")(Record("chat.jsonl:1", {"messages": messages}))
    assert_trains_assistant_turns(tokenizer, example, messages, style)


# --- the two failures of issue 15 -------------------------------------------------------------------

COLON = Style(
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ 'assistant: ' + m['content'] + eos_token + '\\n' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    "</s>",
)
"""A generation prompt that ends in a space (``assistant: ``)."""


def mistral_folder(path: Path, template: str) -> Path:
    """A Mistral-family model folder as a user has it: ``config.json`` says mistral, the tokenizer
    files say ``LlamaTokenizerFast`` (SentencePiece-style ``tokenizer.json``)."""
    tokenizer = sentencepiece_tokenizer()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (path / "config.json").write_text(json.dumps(model_config))
    return path


@pytest.mark.parametrize(("style", "conversation"), [(COLON, SINGLE), (COLON, MULTI), (MISTRAL_V03, MULTI)])
def test_mistral_family_folder_trains_multi_turn(tmp_path, style: Style, conversation: list[dict]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mistral_folder(tmp_path / "model", style.template))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    bundle = build_datasets(DataConfig(path=str(data)), tokenizer, seed=0)
    assert_trains_assistant_turns(tokenizer, bundle.train[0], conversation, style)


def test_generation_prompt_ending_in_a_space_tokenizes_differently(tmp_path) -> None:
    """Why token prefixes could not work: the prompt alone ends in a lone ``▁`` token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mistral_folder(tmp_path / "model", COLON.template))
    prompt = render_chat(tokenizer, SINGLE[:1], add_generation_prompt=True)
    whole = render_chat(tokenizer, SINGLE)
    assert whole.startswith(prompt) and prompt.endswith(": ")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.encode(whole, add_special_tokens=False)[: len(prompt_ids)] != prompt_ids


# --- generation blocks, slow tokenizers, contents that cannot be found ----------------------------

GENERATION_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_generation_blocks_decide_what_is_trained(tokenizers) -> None:
    tokenizer = tokenizers["byte-level"]
    tokenizer.chat_template = GENERATION_CHATML
    example = Encoder(tokenizer, "messages")(Record("x:1", {"messages": MULTI}))
    assert_trains_assistant_turns(tokenizer, example, MULTI, CHATML)


def test_prompt_completion_trains_the_completion_only(tokenizers) -> None:
    tokenizer = tokenizers["byte-level"]
    record = {"prompt": MULTI[:4], "completion": MULTI[4:]}
    for template in (CHATML.template, GENERATION_CHATML):
        tokenizer.chat_template = template
        example = Encoder(tokenizer, "prompt-completion")(Record("x:1", record))
        runs = [decode(tokenizer, run) for run in example.trained_runs()]
        assert runs == [MULTI[4]["content"] + "<|im_end|>"]


def test_slow_tokenizer_is_refused_in_one_line(tokenizers) -> None:
    class Slow:  # what a Python-backend tokenizer looks like to the encoder: no offset mapping
        is_fast = False
        bos_token_id = None
        chat_template = CHATML.template

    with pytest.raises(DataError, match=r"^x:3: training only on assistant turns needs a fast tokenizer"):
        Encoder(Slow(), "messages")(Record("x:3", {"messages": SINGLE}))


def test_one_character_answer_is_not_found_in_a_role_header(tokenizers) -> None:
    tokenizer = tokenizers["byte-level"]
    tokenizer.chat_template = LLAMA3.template  # "assistant" contains "a"
    messages = [{"role": "user", "content": "First letter?"}, {"role": "assistant", "content": "a"}]
    example = Encoder(tokenizer, "messages")(Record("x:1", {"messages": messages}))
    assert [decode(tokenizer, run) for run in example.trained_runs()] == ["a<|eot_id|>"]


# --- the real SmolLM2-135M-Instruct tokenizer and template -------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and ChatML template, read from the packaged GGUF file."""
    from pesocli.models import _load_tokenizer, resolve_model

    file = resolve_model("smollm2-135m").gguf_path
    assert file is not None
    return _load_tokenizer(file.parent, False, gguf_file=file.name)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_real_template(smollm2_tokenizer, conversation: str) -> None:
    messages = CONVERSATIONS[conversation]
    example = Encoder(smollm2_tokenizer, "messages")(Record("x:1", {"messages": messages}))
    assert_trains_assistant_turns(smollm2_tokenizer, example, messages, CHATML)
    single = Encoder(smollm2_tokenizer, "messages")(Record("x:1", {"messages": SINGLE}))
    assert "You are a helpful AI assistant named SmolLM" in smollm2_tokenizer.decode(single.input_ids)
