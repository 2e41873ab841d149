"""Regenerate the offline data of the ``taskarith_*`` lm-eval tasks (deterministic).

    python recipes/tasks/make_data.py            # writes recipes/tasks/data/*.jsonl

Every task uses only words of the tiny test/demo vocabulary: digits 0-9, letters a-h and
``up down sum rev : =``. Each example is ``{"prompt": ..., "answer": ...}`` (multiple-choice
tasks also carry ``"choices"`` and the ``"label"`` index).

Splits: ``validation`` (for choosing merge coefficients), ``test`` (for reporting) and, except
for ``sum``, ``train`` (``data/<task>_train.jsonl``, the demo's finetuning data; not an lm-eval
split). The three never share an example. The runs are cyclic (``9`` is followed by ``0``, ``h``
by ``a``) over every start and length, so a model that scores on held-out prompts has learned the
rule (next digit/letter) rather than the prompts it was trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

DIGITS = [str(i) for i in range(10)]
LETTERS = list("abcdefgh")
HERE = Path(__file__).resolve().parent


def _runs(symbols: List[str], step: int, word: str, max_len: int) -> List[Dict]:
    """Cyclic runs ``word : s s+step ...`` of 1..max_len symbols → the next symbol, every start."""
    n = len(symbols)
    out = []
    for start in range(n):
        for length in range(1, max_len + 1):
            seq = [symbols[(start + step * i) % n] for i in range(length)]
            prompt = (f"{word} : " if word else "") + " ".join(seq)
            out.append({"prompt": prompt, "answer": symbols[(start + step * length) % n]})
    return out


def _split3(rows: List[Dict], n_train: int, seed: int) -> Dict[str, List[Dict]]:
    """A seeded shuffle cut into train (``n_train``), then validation and test (half each)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rest = rows[n_train:]
    half = len(rest) // 2
    return {"train": rows[:n_train], "validation": rest[:half], "test": rest[half:]}


def count_up() -> List[Dict]:
    """``up : 8 9 0`` → ``1`` (1 to 9 given digits, counting on past 9 to 0)."""
    return _runs(DIGITS, 1, "up", 9)


def count_down() -> List[Dict]:
    """``down : 1 0 9`` → ``8`` (1 to 9 given digits, counting on below 0 to 9)."""
    return _runs(DIGITS, -1, "down", 9)


def add() -> List[Dict]:
    """``sum : 3 4 =`` → ``7`` (single-digit sums)."""
    return [
        {"prompt": f"sum : {a} {b} =", "answer": str(a + b)} for a in range(10) for b in range(10) if a + b <= 9
    ]


def letters() -> List[Dict]:
    """``g h a`` → ``b``: continuing a cyclic run of letters, the family's "unwanted behaviour"
    (negation target); 1 to 11 given letters."""
    return _runs(LETTERS, 1, "", 11)


def letters_down() -> List[Dict]:
    """``down : b a h`` → ``g``: a cyclic run of letters backwards; 1 to 11 given letters."""
    return _runs(LETTERS, -1, "down", 11)


def reverse(n_eval: int = 50, n_train: int = 600, seed: int = 0) -> Dict[str, List[Dict]]:
    """``rev : 3 8 1 =`` → ``1 8 3`` (2 or 3 digits; generated, scored on the first len(answer) words).

    Distinct random strings: ``n_eval`` each for validation and test, ``n_train`` for training.
    """
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < 2 * n_eval + n_train:
        seq = tuple(rng.choice(DIGITS) for _ in range(rng.randint(2, 3)))
        if seq in seen:
            continue
        seen.add(seq)
        rows.append({"prompt": "rev : " + " ".join(seq) + " =", "answer": " ".join(reversed(seq))})
    return {"validation": rows[0 : 2 * n_eval : 2], "test": rows[1 : 2 * n_eval : 2], "train": rows[2 * n_eval :]}


def with_choices(rows: List[Dict], choices: List[str]) -> List[Dict]:
    return [{**r, "choices": choices, "label": choices.index(r["answer"])} for r in rows]


def _alternate(rows: List[Dict]) -> Dict[str, List[Dict]]:
    return {"validation": rows[0::2], "test": rows[1::2]}


TASKS: Dict[str, Dict[str, List[Dict]]] = {
    "count_up": _split3(with_choices(count_up(), DIGITS), 30, seed=1),
    "count_down": _split3(with_choices(count_down(), DIGITS), 30, seed=2),
    "sum": _alternate(with_choices(add(), DIGITS)),
    "letters": _split3(with_choices(letters(), LETTERS), 28, seed=3),
    "letters_down": _split3(with_choices(letters_down(), LETTERS), 28, seed=4),
    "rev": reverse(),
}


def main() -> None:
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    for name, splits in TASKS.items():
        for split, part in splits.items():
            with open(data / f"{name}_{split}.jsonl", "w") as fh:
                for row in part:
                    fh.write(json.dumps(row) + "\n")
        print(f"{name}: " + ", ".join(f"{len(part)} {split}" for split, part in splits.items()))


if __name__ == "__main__":
    main()
