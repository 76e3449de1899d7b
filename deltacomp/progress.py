"""Progress bars on long work (tqdm), silent when disabled or when stderr is not a terminal in CI."""
from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, unit: str = "it", enable: bool = True) -> Iterable[T]:
    if not enable:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
