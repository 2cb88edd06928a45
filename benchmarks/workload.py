"""Deterministic synthetic text for benchmarks: readable sentences, different per seed.

Written for kvcellar (no third-party text). Every user turn carries a paragraph of "notes" so that
conversation histories grow to thousands of tokens in a few rounds, as in LMCache's multi-round QA.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "The harbour master",
    "A survey team",
    "The night keeper",
    "The river pilot",
    "Our supplier",
    "The inspector",
    "A fishing crew",
    "The weather office",
    "The depot manager",
    "A volunteer",
]
_VERBS = [
    "reported",
    "measured",
    "repaired",
    "inspected",
    "ordered",
    "logged",
    "replaced",
    "cleaned",
    "tested",
    "painted",
]
_OBJECTS = [
    "the north breakwater",
    "the tide gauge",
    "twelve mooring buoys",
    "the signal mast",
    "the east slipway",
    "the diesel pump",
    "the radio antenna",
    "the harbour crane",
    "the channel markers",
    "the storm shutters",
    "the boathouse roof",
    "the pilot launch",
]
_TAILS = [
    "before the spring tides",
    "after the October gales",
    "during the night shift",
    "at a cost of {n} pounds",
    "in {n} hours of work",
    "with {n} spare parts left",
    "on the {n}th of the month",
    "while the wind stayed under {n} knots",
]


def paragraph(seed: int, sentences: int) -> str:
    """``sentences`` plausible maintenance-log sentences, fixed by ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        tail = rng.choice(_TAILS).format(n=rng.randint(2, 95))
        out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {tail}.")
    return " ".join(out)


def user_turn(user: int, round_: int, sentences: int) -> str:
    notes = paragraph(1000 * user + round_, sentences)
    return f"Here are today's notes from the harbour log:\n{notes}\nWhich item in these notes needs attention first?"
