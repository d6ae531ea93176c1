"""Operating points: thresholds chosen on a labelled set for a target precision or recall,
and the thresholds file that carries them to `serve`, `classify` and `batch`.

The paper reports one operating point (precision 99.4%, recall 95.6%, acceptable texts as the
positives); a user picks theirs. The curve is computed on a score (P(not acceptable) for the
overall threshold, a category's probability for its own) against gold labels; a text is flagged
when its score >= the threshold, so every candidate threshold is one of the scores seen.

The file (JSON):
    {"policy": "paper", "threshold": 0.42 or null, "thresholds": {"category id": 0.3, ...},
     "target": {"precision": 0.95}, "dataset": "...", "examples": 1680, "points": [...]}
With `thresholds` non-empty the decision uses per-category thresholds (only those categories
are filtered); otherwise `threshold` replaces the default threshold on P(not acceptable).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moderation.core.errors import prefix, quote
from moderation.core.policy import Policy, PolicyError


class ThresholdsError(PolicyError):
    """A thresholds file that cannot be used, or a target that the data cannot reach."""


@dataclass(frozen=True)
class CurvePoint:
    """Flagging texts whose score >= threshold: what that gives on the labelled set."""

    threshold: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "precision": self.precision,
            "recall": self.recall,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


def pr_curve(scores: Sequence[float], positives: Sequence[bool]) -> list[CurvePoint]:
    """One point per distinct score, highest threshold first (ties are admitted together)."""
    total = sum(positives)
    pairs = sorted(zip(scores, positives, strict=True), key=lambda x: -x[0])
    points: list[CurvePoint] = []
    tp = fp = 0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            tp += pairs[j][1]
            fp += not pairs[j][1]
            j += 1
        precision = tp / (tp + fp)
        recall = tp / total if total else 0.0
        points.append(CurvePoint(pairs[i][0], precision, recall, tp, fp, total - tp))
        i = j
    return points


def choose_point(
    scores: Sequence[float],
    positives: Sequence[bool],
    *,
    target_precision: float | None = None,
    target_recall: float | None = None,
) -> CurvePoint:
    """The operating point for one target: the highest recall whose precision >= the target,
    or the highest precision whose recall >= the target (ties: the other measure, then the
    higher threshold). ThresholdsError when no threshold reaches the target."""
    if (target_precision is None) == (target_recall is None):
        raise ValueError("give exactly one of target_precision and target_recall")
    if not any(positives):
        raise ThresholdsError("no positive examples: no threshold can be chosen")
    curve = pr_curve(scores, positives)
    if target_precision is not None:
        ok = [p for p in curve if p.precision >= target_precision]
        key = lambda p: (p.recall, p.precision, p.threshold)  # noqa: E731
        goal = f"precision {target_precision}"
    else:
        assert target_recall is not None
        ok = [p for p in curve if p.recall >= target_recall]
        key = lambda p: (p.precision, p.recall, p.threshold)  # noqa: E731
        goal = f"recall {target_recall}"
    if not ok:
        best = max(curve, key=lambda p: p.precision if target_precision is not None else p.recall)
        raise ThresholdsError(
            f"no threshold reaches {goal} on this set (best: precision {best.precision:.3f}, "
            f"recall {best.recall:.3f} at {best.threshold:.4g})"
        )
    return max(ok, key=key)


def curve_summary(curve: Sequence[CurvePoint], chosen: CurvePoint, n: int = 20) -> list[CurvePoint]:
    """At most n points of a curve spread along it, the chosen one always included."""
    if len(curve) <= n:
        return list(curve)
    step = (len(curve) - 1) / (n - 1)
    picked = {curve[round(k * step)] for k in range(n)} | {chosen}
    return sorted(picked, key=lambda p: -p.threshold)


@dataclass(frozen=True)
class OperatingPoint:
    """The thresholds of one policy, as a thresholds file holds them."""

    policy: str
    threshold: float | None = None
    category_thresholds: Mapping[str, float] = field(default_factory=dict)
    source: str = ""


def _check(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ThresholdsError(f"{where}: {name} must be a number, got {quote(value)}")
    if not 0.0 <= value <= 1.0:
        raise ThresholdsError(f"{where}: {name} must be between 0 and 1, got {quote(value)}")
    return float(value)


def parse_operating_point(data: Any, where: str = "thresholds") -> OperatingPoint:
    if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
        raise ThresholdsError(f'{where}: expected a JSON object with "policy" (a policy name)')
    threshold = data.get("threshold")
    if threshold is not None:
        threshold = _check("threshold", threshold, where)
    per = data.get("thresholds") or {}
    if not isinstance(per, dict):
        raise ThresholdsError(f'{where}: "thresholds" must map category ids to numbers')
    categories = {str(k): _check(f"thresholds[{prefix(k)}]", v, where) for k, v in per.items()}
    if threshold is None and not categories:
        raise ThresholdsError(f'{where}: neither "threshold" nor "thresholds" is set')
    return OperatingPoint(data["policy"], threshold, categories, where)


def load_operating_point(path: str | Path) -> OperatingPoint:
    """Read a thresholds file (what `moderation eval --write-thresholds` writes)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ThresholdsError(f"cannot read thresholds file {path}: {exc.strerror}") from exc
    except RecursionError:  # nested past Python's decoder (a file 200k levels deep)
        message = f"thresholds file {path} is not valid JSON: nested too deep"
        raise ThresholdsError(message) from None
    except ValueError as exc:  # bad JSON, bad UTF-8, integers past 4,300 digits
        reason = str(exc).split(":")[0]
        raise ThresholdsError(f"thresholds file {path} is not valid JSON: {reason}") from exc
    return parse_operating_point(data, str(path))


def load_operating_points(paths: Sequence[str | Path]) -> dict[str, OperatingPoint]:
    """Thresholds files by policy name; two files for one policy are an error."""
    points: dict[str, OperatingPoint] = {}
    for path in paths:
        point = load_operating_point(path)
        if point.policy in points:
            raise ThresholdsError(
                f"{path} and {points[point.policy].source} both set thresholds for policy "
                f"{point.policy!r}"
            )
        points[point.policy] = point
    return points


def check_operating_point(point: OperatingPoint, policies: Mapping[str, Policy]) -> None:
    """ThresholdsError unless the point's policy is known and has every category it names."""
    where = point.source or "thresholds"
    policy = policies.get(point.policy)
    if policy is None:
        raise ThresholdsError(
            f"{where}: unknown policy {point.policy!r}; known: {', '.join(sorted(policies))}"
        )
    unknown = sorted(set(point.category_thresholds) - set(policy.category_ids))
    if unknown:
        raise ThresholdsError(
            f"{where}: policy {policy.name!r} has no category {unknown[0]!r}; "
            f"its categories: {', '.join(policy.category_ids)}"
        )


DEFAULT_SOURCE = "MODERATION_THRESHOLD"
"""The source of a policy's thresholds when no thresholds file names it: the server's default."""


@dataclass(frozen=True)
class LiveThresholds:
    """The thresholds a server applies to requests of a policy that set none, and where they
    come from (a thresholds file, or the default threshold setting)."""

    policy: str
    threshold: float  # on P(not acceptable); ignored while category_thresholds is non-empty
    category_thresholds: Mapping[str, float]
    source: str  # the thresholds file's path, or DEFAULT_SOURCE


def live_thresholds(
    policies: Sequence[str], default: float, points: Mapping[str, OperatingPoint]
) -> list[LiveThresholds]:
    """Per policy, what a request that sets no threshold is decided with (the rule of
    `Planner`: a thresholds file's point replaces the default threshold for its policy)."""
    out = []
    for name in policies:
        point = points.get(name)
        if point is None:
            out.append(LiveThresholds(name, default, {}, DEFAULT_SOURCE))
            continue
        threshold = default if point.threshold is None else point.threshold
        out.append(
            LiveThresholds(
                name, threshold, dict(point.category_thresholds), point.source or "thresholds"
            )
        )
    return out
