"""Seeds of generated images: image k of a run uses ``base + k``, so any image can be made again alone."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

MAX_SEED = 2**31 - 1


def random_seed() -> int:
    """A fresh seed in [0, MAX_SEED], from the operating system's entropy."""
    return int(np.random.SeedSequence().generate_state(1)[0] % (MAX_SEED + 1))


def image_seeds(count: int, base: Optional[int] = None) -> List[int]:
    """``base, base + 1, ...`` for ``count`` images; a random base when none is given."""
    base = random_seed() if base is None else int(base)
    return [base + k for k in range(count)]
