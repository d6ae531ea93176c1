"""Choosing an operating point on a labelled set (`moderation eval --target-precision P` or
`--target-recall R`), and the thresholds file it writes.

Overall: one threshold on P(not acceptable), unsafe texts (any category) as the positives.
Per category (`--per-category`): for each category of the policy, a threshold on that
category's probability, the texts labelled with the category (or with its paper category) as
the positives and acceptable texts plus other categories' texts as the negatives; texts labelled
only "unsafe" (no category) are left out. A category without positive examples in the set gets
the overall threshold and is listed as uncalibrated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moderation.core.decision import Classification
from moderation.core.policy import ACCEPTABLE_ID, Policy
from moderation.core.thresholds import CurvePoint, choose_point, curve_summary, pr_curve
from moderation.jobs.datasets import UNSAFE, Example

OVERALL = "unsafe"


@dataclass(frozen=True)
class Target:
    measure: str  # "precision" or "recall"
    value: float

    def choose(self, scores: Sequence[float], positives: Sequence[bool]) -> CurvePoint:
        if self.measure == "precision":
            return choose_point(scores, positives, target_precision=self.value)
        return choose_point(scores, positives, target_recall=self.value)


@dataclass(frozen=True)
class Calibration:
    policy: str
    target: Target
    overall: CurvePoint
    categories: dict[str, CurvePoint]  # per category, when asked for
    uncalibrated: list[str]
    curves: dict[str, list[CurvePoint]]  # "unsafe" and each category: summary points

    def file_data(self, dataset: str, examples: int) -> dict[str, Any]:
        thresholds = {c: p.threshold for c, p in self.categories.items()}
        for c in self.uncalibrated:
            thresholds[c] = self.overall.threshold
        return {
            "policy": self.policy,
            "threshold": None if thresholds else self.overall.threshold,
            "thresholds": thresholds,
            "target": {self.target.measure: self.target.value},
            "dataset": dataset,
            "examples": examples,
            "uncalibrated": self.uncalibrated,
            "chosen": {
                OVERALL: self.overall.to_dict(),
                **{c: p.to_dict() for c, p in self.categories.items()},
            },
            "points": {name: [p.to_dict() for p in curve] for name, curve in self.curves.items()},
        }

    def write(self, path: str | Path, dataset: str, examples: int) -> None:
        Path(path).write_text(json.dumps(self.file_data(dataset, examples), indent=2) + "\n")


def calibrate(
    examples: Sequence[Example],
    results: Sequence[Classification | str],
    policy: Policy,
    target: Target,
    *,
    per_category: bool = False,
) -> Calibration:
    """The operating point(s) for a target on scored examples (failed items are left out)."""
    pairs = [(e, r) for e, r in zip(examples, results, strict=True) if not isinstance(r, str)]
    scores = [r.unsafe_probability for _, r in pairs]
    positives = [e.unsafe for e, _ in pairs]
    overall = target.choose(scores, positives)
    curves = {OVERALL: curve_summary(pr_curve(scores, positives), overall)}
    categories: dict[str, CurvePoint] = {}
    uncalibrated: list[str] = []
    if per_category:
        known = [(e, r) for e, r in pairs if e.label != UNSAFE]
        for cat in policy.categories:
            mine = {cat.id, cat.paper_category}
            cat_scores = [r.scores[cat.id] for _, r in known]
            cat_positives = [e.label in mine and e.label != ACCEPTABLE_ID for e, _ in known]
            if not any(cat_positives):
                uncalibrated.append(cat.id)
                continue
            point = target.choose(cat_scores, cat_positives)
            categories[cat.id] = point
            curves[cat.id] = curve_summary(pr_curve(cat_scores, cat_positives), point)
    return Calibration(policy.name, target, overall, categories, uncalibrated, curves)


def distinct(values: Sequence[float], least: int = 4) -> list[str]:
    """The values with the fewest significant digits (at least `least`) that tell apart the
    ones that differ: a trained model puts many thresholds just under 1 (0.99991, 0.99997),
    which four digits would all print as `1`. Nothing under 1 prints as `1`."""
    wanted = len(set(values))
    for digits in range(least, 18):
        shown = [f"{v:.{digits}g}" for v in values]
        rounded_up = any(t == "1" and v != 1.0 for t, v in zip(shown, values, strict=True))
        if len(set(shown)) == wanted and not rounded_up:
            return shown
    return [repr(v) for v in values]


def calibration_table(c: Calibration) -> str:
    """The chosen points and the curves around them, for a terminal."""
    lines = [f"operating point for {c.target.measure} >= {c.target.value} (policy {c.policy})"]
    chosen = {OVERALL: c.overall, **c.categories}
    for name, curve in c.curves.items():
        shown = distinct([p.threshold for p in curve])
        width = max(10, *(len(t) for t in shown))
        lines.append("")
        lines.append(f"{name}: {'threshold':>{width}} {'precision':>9} {'recall':>7}")
        for p, threshold in zip(curve, shown, strict=True):
            mark = "  <- chosen" if p == chosen[name] else ""
            lines.append(
                f"{'':{len(name) + 1}} {threshold:>{width}} {p.precision:9.3f} "
                f"{p.recall:7.3f}{mark}"
            )
    if c.uncalibrated:
        overall = [p.threshold for p in c.curves[OVERALL]]
        lines.append(
            f"\nno positive examples for {', '.join(c.uncalibrated)}: they get the overall "
            f"threshold {distinct([c.overall.threshold, *overall])[0]}"
        )
    return "\n".join(lines)
