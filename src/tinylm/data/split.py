"""The held-out split every data set uses: a seeded shuffle of keys, the last share held out."""

from __future__ import annotations

import random
from collections.abc import Sequence

from tinylm.errors import UserError


def held_out(keys: Sequence, val_fraction: float, seed: int, what: str) -> set:
    """The keys held out: the last `val_fraction` of a shuffle seeded by `seed`.
    Deterministic for a seed; `what` names the keys in errors ("conversations")."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    order = list(keys)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and (n_val == 0 or n_val == len(order)):
        raise UserError(f"{len(order)} {what} are too few to hold out {val_fraction:.0%}; "
                        "give more or set data.val_fraction=0")
    return set(order[len(order) - n_val :])
