"""What every attack family shares."""

from __future__ import annotations

import numpy as np


def fixed_rng() -> np.random.Generator:
    return np.random.default_rng(0)  # patterns are part of the attack, not of the poisoning seed
