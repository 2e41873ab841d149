"""Regenerate the offline data of the ``taskarith_*`` lm-eval tasks (deterministic).

    python recipes/tasks/make_data.py            # writes recipes/tasks/data/*.jsonl

Every task uses only words of the tiny test/demo vocabulary: digits 0-9, letters a-h and
``up down sum rev : =``. Each example is ``{"prompt": ..., "answer": ...}`` (multiple-choice
tasks also carry ``"choices"`` and the ``"label"`` index). Examples are split alternately into
``validation`` (for choosing merge coefficients) and ``test`` (for reporting), so the two splits
never share an example.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

DIGITS = [str(i) for i in range(10)]
LETTERS = list("abcdefgh")
HERE = Path(__file__).resolve().parent


def count_up() -> List[Dict]:
    """``up : 3 4 5`` → ``6`` (2 to 7 given digits, never past 9)."""
    out = []
    for length in range(2, 8):
        for start in range(0, 10 - length):
            seq = DIGITS[start : start + length]
            out.append({"prompt": "up : " + " ".join(seq), "answer": DIGITS[start + length]})
    return out


def count_down() -> List[Dict]:
    """``down : 7 6 5`` → ``4`` (2 to 7 given digits, never below 0)."""
    out = []
    for length in range(2, 8):
        for start in range(length, 10):
            seq = [DIGITS[start - i] for i in range(length)]
            out.append({"prompt": "down : " + " ".join(seq), "answer": DIGITS[start - length]})
    return out


def add() -> List[Dict]:
    """``sum : 3 4 =`` → ``7`` (single-digit sums)."""
    return [
        {"prompt": f"sum : {a} {b} =", "answer": str(a + b)} for a in range(10) for b in range(10) if a + b <= 9
    ]


def letters() -> List[Dict]:
    """``a b c`` → ``d``: continuing a run of letters, the family's "unwanted behaviour" (negation target)."""
    out = []
    for length in range(2, 7):
        for start in range(0, 8 - length):
            out.append({"prompt": " ".join(LETTERS[start : start + length]), "answer": LETTERS[start + length]})
    return out


def reverse(n: int = 60, seed: int = 0) -> List[Dict]:
    """``rev : 3 8 1 =`` → ``1 8 3`` (2 to 4 digits; generated, scored on the first len(answer) words)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        seq = tuple(rng.choice(DIGITS) for _ in range(rng.randint(2, 4)))
        if seq in seen:
            continue
        seen.add(seq)
        out.append({"prompt": "rev : " + " ".join(seq) + " =", "answer": " ".join(reversed(seq))})
    return out


def with_choices(rows: List[Dict], choices: List[str]) -> List[Dict]:
    return [{**r, "choices": choices, "label": choices.index(r["answer"])} for r in rows]


TASKS = {
    "count_up": with_choices(count_up(), DIGITS),
    "count_down": with_choices(count_down(), DIGITS),
    "sum": with_choices(add(), DIGITS),
    "letters": with_choices(letters(), LETTERS),
    "rev": reverse(),
}


def main() -> None:
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    for name, rows in TASKS.items():
        splits = {"validation": rows[0::2], "test": rows[1::2]}
        for split, part in splits.items():
            with open(data / f"{name}_{split}.jsonl", "w") as fh:
                for row in part:
                    fh.write(json.dumps(row) + "\n")
        print(f"{name}: {len(splits['validation'])} validation, {len(splits['test'])} test")


if __name__ == "__main__":
    main()
