"""Train the tiny byte-level BPE tokenizer shipped in ``pesocli/assets/tiny-tokenizer/``.

Byte-level, so any text tokenizes without ``<|unk|>``. Trained on the shipped arithmetic data
(run ``scripts/make_arith_data.py`` first) plus the prompt and chat templates. Special tokens
take ids 0..6 in the order of ``SPECIALS``. The chat template is ``templates/chat/simple.jinja``.
Deterministic: rerunning writes the same files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "pesocli" / "assets" / "tiny-tokenizer"
TEMPLATES = ROOT / "templates"
TRAIN_DATA = ROOT / "pesocli" / "assets" / "data" / "arith_train.jsonl"

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIALS = (PAD, BOS, EOS, UNK, *ROLES)


def corpus() -> list[str]:
    """Training texts: every record rendered with every prompt template, plus the templates."""
    templates = [json.loads(p.read_text()) for p in sorted((TEMPLATES / "prompts").glob("*.json"))]
    texts = []
    for line in TRAIN_DATA.read_text().splitlines():
        record = json.loads(line)
        for t in templates:
            texts.append(t["prompt"].format(**record) + t["response"].format(**record))
    for t in templates:
        texts.extend(t[k] for k in ("prompt", "prompt_with_input", "response"))
    texts.append("Question: Answer: Input: System: You are a helpful assistant.")
    return texts


def train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # tokenizer(text) prepends BOS like Llama; peso's data code tokenizes without special tokens.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLES),
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = (TEMPLATES / "chat" / "simple.jinja").read_text()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)  # nothing stale from an older transformers version
    fast.save_pretrained(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    tok = train(args.vocab_size)
    save(tok, args.out)
    print(f"wrote a {tok.get_vocab_size()}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
