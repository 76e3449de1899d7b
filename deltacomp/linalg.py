"""Small dense factorizations (eigh, QR, least squares) run on one thread.

Why: on 2-core machines LAPACK's threaded paths degrade badly as soon as anything else uses a core —
measured here under load on a 1536 x 576 delta: float64 eigh of its 576 x 576 Gram took 3.3 s on 2 threads
vs 0.07 s on 1, float32 SVD 2.7 s vs 0.25 s. These matrices are small, so one thread costs little even on
an idle machine; the big matrix products around them keep torch's thread count.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)
