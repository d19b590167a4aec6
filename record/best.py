"""The one rule for "best": a trial's best milestone by a metric, with FIDs compared only on a
common basis — the same sample count and the same reference (FID is biased by the count, and each
reference is its own yardstick). The tables, plots, report, decisions and `sweep status` all ask
here."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from diffusion_lib.milestone import BEST_FID, FID, FID_NUM_SAMPLES, FID_REF_NUM_IMAGES, FID_REFERENCE, STEP

Row = dict[str, Any]
Basis = tuple  # (sample count, reference)
ON_A_BASIS = (FID.name, BEST_FID.name)  # metrics that compare only on one basis


def is_finite_number(value: Any) -> bool:
    """A metric value that can be ranked and plotted (a missing or NaN value cannot)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fid_basis(row: Row) -> Basis:
    """What an FID was measured with: its sample count and its reference."""
    return row.get(FID_NUM_SAMPLES.name), row.get(FID_REFERENCE.name) or row.get(FID_REF_NUM_IMAGES.name)


def common_basis(curves: dict[str, list[Row]]) -> tuple[Optional[Basis], list[str]]:
    """The FID basis most trials share — on a tie the one with more FIDs, then the larger sample
    count — (None when no trial has an FID), and the trials with an FID on another basis."""
    holders: dict[Basis, set[str]] = {}
    fids: dict[Basis, int] = {}
    for name, rows in curves.items():
        for row in rows:
            if is_finite_number(row.get(FID.name)):
                basis = fid_basis(row)
                holders.setdefault(basis, set()).add(name)
                fids[basis] = fids.get(basis, 0) + 1
    if not holders:
        return None, []
    common = max(holders, key=lambda b: (len(holders[b]), fids[b], b[0] if isinstance(b[0], int) else -1))
    others = sorted({name for basis, names in holders.items() if basis != common for name in names})
    return common, others


def comparable_rows(rows: Iterable[Row], metric: str, basis: Optional[Basis]) -> list[Row]:
    """The rows with a finite `metric`; for an FID, only those measured on `basis`."""
    return [r for r in rows if is_finite_number(r.get(metric)) and (metric not in ON_A_BASIS or fid_basis(r) == basis)]


def best_milestone(
    rows: Iterable[Row], metric: str, mode: str, basis: Optional[Basis], *, steps: Optional[set[int]] = None
) -> Optional[Row]:
    """The best row by `metric` among the comparable ones (and, with `steps`, among the rows at
    those steps, e.g. the ones whose checkpoint was kept); None when there is none."""
    candidates = [r for r in comparable_rows(rows, metric, basis) if steps is None or r[STEP.name] in steps]
    if not candidates:
        return None
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda r: r[metric])
