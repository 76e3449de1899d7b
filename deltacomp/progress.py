"""Progress bars on long work (tqdm), silent when disabled or when stderr is not a terminal in CI."""
from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, unit: str = "it", enable: bool = True,
                 total: int | None = None) -> Iterable[T]:
    """``total``: how many items at most, for a generator (a sized ``items`` gives its own)."""
    if not enable:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True, total=total)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_counter(total: int, desc: str, unit: str = "it", enable: bool = True):
    """A bar advanced by hand (``.update()``, ``.close()``): for work that finishes out of a loop's order."""
    if not enable:
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
