"""Text alignment at matched fidelity: each method's upper envelope of (fidelity, text alignment) points.

A method reaches a fidelity level f with text alignment TA(f) when some point of its path (any checkpoint, any
learning rate) has fidelity ≥ f; the best such TA, as a function of f, is the method's *upper envelope*: the
Pareto front of its points, non-increasing in f. Between two front points the envelope is interpolated
linearly; below the front's lowest fidelity it is the front's best text alignment; above its highest fidelity
the method does not reach f (None). Comparing methods at the same f is the paper's "at equal fidelity".

Pure functions of plain numbers; units: fidelity and text alignment in [0, 1].
"""
from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

Curve = List[Tuple[float, float]]        # (fidelity, text alignment), fidelity ascending


def upper_envelope(points: Iterable[Tuple[float, float]]) -> Curve:
    """The Pareto front of (fidelity, text alignment) points: no other point has both higher or equal
    fidelity and higher text alignment. Returned by ascending fidelity (text alignment descending)."""
    front: Curve = []
    best = float("-inf")
    for f, ta in sorted(points, key=lambda p: (-p[0], -p[1])):
        if ta > best:
            front.append((f, ta))
            best = ta
    return front[::-1]


def at_fidelity(envelope: Curve, level: float) -> Optional[float]:
    """Text alignment of the envelope at fidelity ``level`` (None when the envelope never reaches it)."""
    if not envelope or level > envelope[-1][0]:
        return None
    if level <= envelope[0][0]:
        return envelope[0][1]
    for (f0, t0), (f1, t1) in zip(envelope, envelope[1:]):
        if f0 < level <= f1:
            return t0 + (t1 - t0) * (level - f0) / (f1 - f0)
    raise AssertionError("unreachable: level inside the envelope's range")


def matched(curves: Dict[str, Sequence[Curve]], levels: Sequence[float]) -> Dict[str, List[dict]]:
    """Per method and level: text alignment over the method's runs (one envelope per concept × seed) that
    reach the level — mean, sample standard deviation (0 for one run), how many reached it of how many."""
    table = {}
    for method, envs in curves.items():
        rows = []
        for level in levels:
            vals = [v for v in (at_fidelity(e, level) for e in envs) if v is not None]
            rows.append({"level": level, "n": len(vals), "of": len(envs),
                         "mean": statistics.mean(vals) if vals else None,
                         "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0})
        table[method] = rows
    return table


def mean_curve(envs: Sequence[Curve], grid: Sequence[float]) -> Curve:
    """The envelopes' mean text alignment at each grid fidelity every one of them reaches (for plotting)."""
    out = []
    for level in grid:
        vals = [at_fidelity(e, level) for e in envs]
        if envs and all(v is not None for v in vals):
            out.append((level, statistics.mean(vals)))
    return out
