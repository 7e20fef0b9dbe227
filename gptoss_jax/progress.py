"""Progress reporting shared by loading and conversion (the lowest layer: no other module of ours)."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, *, quiet: bool, initial: int = 0, terminal_only: bool = True):
    """A tqdm byte counter on stderr.

    `terminal_only` hides it when stderr is not a terminal (logs, notebooks); the converter keeps it in logs.
    """
    from tqdm import tqdm

    disable = quiet or (terminal_only and not sys.stderr.isatty())
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=disable, file=sys.stderr, dynamic_ncols=True, leave=not terminal_only)  # fmt: skip
