"""A synthetic dialogue dataset with learnable structure, written by us, generated from a seed.

Each conversation has one to three user/assistant turns drawn from five task families whose answers are
a deterministic function of the question (so a model that reads the context can predict them):

  arithmetic   "What is 23 + 45?"            -> "23 + 45 = 68."
  counting     "Count from 3 to 7."          -> "3, 4, 5, 6, 7."
  reversal     "Reverse the word 'planet'."  -> "The reverse of 'planet' is 'tenalp'."
  lookup       "What color is a banana?"     -> "A banana is yellow."
  spelling     "Spell the word 'cat'."       -> "c-a-t."

Guarantees: the same ``(n, seed)`` gives byte-identical JSONL on every machine (only ``random.Random``
and sorted literals are used); records follow the ``{"id", "conversations": [{role, content}]}`` format
that ``zmqdisagg.train.data`` reads. Run ``python -m zmqdisagg.train.demo_data OUT.jsonl -n 2000``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

WORDS = ("apple", "river", "planet", "garden", "window", "silver", "rocket", "forest", "candle", "bridge",
         "tiger", "cloud", "marble", "pencil", "ocean", "castle", "lemon", "winter", "violin", "harbor")
COLORS = {"banana": "yellow", "cherry": "red", "grass": "green", "sky": "blue", "snow": "white",
          "coal": "black", "carrot": "orange", "plum": "purple", "lime": "green", "tomato": "red"}
SYSTEM = "You are a careful assistant. Answer briefly."


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def _counting(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(0, 20)
    stop = start + rng.randint(2, 8)
    return f"Count from {start} to {stop}.", ", ".join(str(i) for i in range(start, stop + 1)) + "."


def _reversal(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Reverse the word '{w}'.", f"The reverse of '{w}' is '{w[::-1]}'."


def _lookup(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(sorted(COLORS))
    return f"What color is a {thing}?", f"A {thing} is {COLORS[thing]}."


def _spelling(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Spell the word '{w}'.", "-".join(w) + "."


TASKS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _arithmetic, _counting, _reversal, _lookup, _spelling)


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """One dialogue: an optional system prompt, then 1-3 question/answer turns."""
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        question, answer = rng.choice(TASKS)(rng)
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs


def write_demo_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` dialogues to ``path`` (atomically) and return it."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"demo-{seed}-{i}", "conversations": conversation(rng)}) + "\n")
    tmp.replace(path)
    logger.info("wrote %d demo dialogues to %s (seed %d)", n, path, seed)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the zmqdisagg synthetic EAGLE3 demo dataset.")
    p.add_argument("out")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_demo_jsonl(args.out, args.n, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
