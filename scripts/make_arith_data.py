"""Generate the shipped arithmetic word-problem data (alpaca format), deterministically.

Writes ``pesocli/assets/data/arith_train.jsonl`` and ``arith_eval.jsonl``. The problems are small
(operands and results in 0..20) and come from a handful of templates, so a 2-layer transformer
visibly learns them in a few hundred steps. Train and eval share no instruction.

Run ``python scripts/make_arith_data.py`` (then ``scripts/make_tiny_tokenizer.py``, which trains
on the train file).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "pesocli" / "assets" / "data"

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe")
OBJECTS = ("apples", "pens", "cards", "books", "eggs", "coins", "shells", "stickers")

# (op, instruction template); the output is "a op b = c\n#### c".
TEMPLATES = (
    ("+", "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have?"),
    ("+", "{name} finds {a} {obj} and then {b} more. How many {obj} did {name} find?"),
    ("-", "{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?"),
    ("-", "There are {a} {obj} in a box. {name} takes {b} out. How many {obj} are in the box?"),
    ("*", "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?"),
    ("*", "{name} buys {a} packs of {obj}. Each pack has {b} {obj}. How many {obj} is that?"),
)


def operands(op: str, rng: random.Random) -> tuple[int, int, int]:
    """Draw ``(a, b, result)`` with everything in 0..20."""
    if op == "+":
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        return a, b, a + b
    if op == "-":
        a = rng.randint(2, 20)
        b = rng.randint(1, a)
        return a, b, a - b
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    while a * b > 20:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
    return a, b, a * b


def make_record(rng: random.Random) -> dict[str, str]:
    """One alpaca record: ``instruction``, empty ``input``, ``output`` ending in ``#### answer``."""
    op, template = rng.choice(TEMPLATES)
    a, b, c = operands(op, rng)
    instruction = template.format(name=rng.choice(NAMES), obj=rng.choice(OBJECTS), a=a, b=b)
    return {"instruction": instruction, "input": "", "output": f"{a} {op} {b} = {c}\n#### {c}"}


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw distinct records; the first ``n_eval`` distinct ones are eval, the rest train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_eval:
        record = make_record(rng)
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    return records[n_eval:], records[:n_eval]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    train, evals = generate(args.train, args.eval, args.seed)
    write_jsonl(args.out / "arith_train.jsonl", train)
    write_jsonl(args.out / "arith_eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {args.out}")


if __name__ == "__main__":
    main()
