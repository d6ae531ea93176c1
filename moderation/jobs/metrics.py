"""The metrics of `moderation eval`, from predictions and gold labels (no I/O, no engine), all
from the same predictions:
- flagged vs unsafe: precision, recall, F1 (unsafe texts are the positives), and the area under
  the precision-recall curve from P(not acceptable) (average precision);
- the paper's figure (section 5.2 reports precision 99.4% at recall 95.6%), which counts
  *acceptable* texts as the positives: of the texts let through, how many were acceptable, and
  of the acceptable texts, how many were let through;
- per paper category: precision, recall and F1 of the predicted paper category among texts
  whose gold label has one;
- a confusion matrix, gold label by predicted paper category (or acceptable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moderation.core.decision import Classification
from moderation.core.policy import ACCEPTABLE_ID, PAPER_CATEGORY_IDS
from moderation.jobs.datasets import UNSAFE, Example


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    support: int  # gold positives

    @classmethod
    def of(cls, tp: int, fp: int, fn: int) -> PRF:
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        return cls(p, r, 2 * p * r / (p + r) if p + r else 0.0, tp + fn)


def average_precision(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the precision-recall curve, as average precision (ties broken together)."""
    total = sum(positives)
    if not total:
        return 0.0
    pairs = sorted(zip(scores, positives, strict=True), key=lambda x: -x[0])
    ap = tp = fp = 0.0
    i = 0
    while i < len(pairs):
        j = i
        step_tp = 0
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:  # a threshold admits all ties
            step_tp += pairs[j][1]
            j += 1
        tp += step_tp
        fp += (j - i) - step_tp
        ap += (step_tp / total) * (tp / (tp + fp))
        i = j
    return ap


@dataclass(frozen=True)
class Report:
    n: int
    failed: int
    unsafe: PRF
    paper_figure: PRF  # acceptable texts as positives
    auc_pr: float
    categories: dict[str, PRF]
    confusion: dict[str, dict[str, int]]  # gold -> predicted -> count

    def to_dict(self) -> dict[str, Any]:
        def prf(x: PRF) -> dict[str, float]:
            return {"precision": x.precision, "recall": x.recall, "f1": x.f1, "support": x.support}

        return {
            "examples": self.n,
            "failed": self.failed,
            "unsafe": prf(self.unsafe),
            "paper_figure_acceptable_positive": prf(self.paper_figure),
            "auc_pr": self.auc_pr,
            "categories": {k: prf(v) for k, v in self.categories.items()},
            "confusion": self.confusion,
        }


def evaluate(examples: Sequence[Example], results: Sequence[Classification | str]) -> Report:
    """Metrics of predictions against gold labels; items that failed (str) are counted apart."""
    pairs = [(e, r) for e, r in zip(examples, results, strict=True) if not isinstance(r, str)]
    gold_unsafe = [e.unsafe for e, _ in pairs]
    flagged = [r.flagged for _, r in pairs]
    tp = sum(g and f for g, f in zip(gold_unsafe, flagged, strict=True))
    fp = sum(f and not g for g, f in zip(gold_unsafe, flagged, strict=True))
    fn = sum(g and not f for g, f in zip(gold_unsafe, flagged, strict=True))
    tn = len(pairs) - tp - fp - fn
    predicted = [r.paper_category if r.flagged else ACCEPTABLE_ID for _, r in pairs]
    if any(r.flagged and r.paper_category == ACCEPTABLE_ID for _, r in pairs):
        # Flagged, yet acceptable is the single most probable paper key: name the worst category.
        predicted = [
            (
                max(PAPER_CATEGORY_IDS, key=lambda c: r.paper_scores[c])
                if r.flagged
                else ACCEPTABLE_ID
            )
            for _, r in pairs
        ]
    categories = {}
    for cat in PAPER_CATEGORY_IDS:
        ctp = sum(e.label == cat and p == cat for (e, _), p in zip(pairs, predicted, strict=True))
        cfp = sum(e.label != cat and p == cat for (e, _), p in zip(pairs, predicted, strict=True))
        cfn = sum(e.label == cat and p != cat for (e, _), p in zip(pairs, predicted, strict=True))
        categories[cat] = PRF.of(ctp, cfp, cfn)
    rows = [ACCEPTABLE_ID, *PAPER_CATEGORY_IDS, UNSAFE]
    confusion = {g: dict.fromkeys([ACCEPTABLE_ID, *PAPER_CATEGORY_IDS], 0) for g in rows}
    for (e, _), p in zip(pairs, predicted, strict=True):
        confusion[e.label][p] += 1
    return Report(
        n=len(examples),
        failed=len(examples) - len(pairs),
        unsafe=PRF.of(tp, fp, fn),
        paper_figure=PRF.of(tn, fn, fp),  # positives = acceptable: let through (tn) ...
        auc_pr=average_precision([r.unsafe_probability for _, r in pairs], gold_unsafe),
        categories=categories,
        confusion=confusion,
    )


def table(report: Report) -> str:
    lines = [f"{report.n} examples, {report.failed} could not be scored", ""]
    lines.append(f"{'':34} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}")

    def row(name: str, x: PRF) -> None:
        lines.append(f"{name:34} {x.precision:9.3f} {x.recall:7.3f} {x.f1:6.3f} {x.support:8d}")

    row("unsafe (flagged)", report.unsafe)
    row("paper figure (acceptable positive)", report.paper_figure)
    for cat, x in report.categories.items():
        row(f"  {cat}", x)
    lines.append(f"\narea under the precision-recall curve (unsafe): {report.auc_pr:.3f}\n")
    cols = [ACCEPTABLE_ID, *PAPER_CATEGORY_IDS]
    # Full names (a header cut to 12 characters left "hateful_hara" to guess), each column as
    # wide as its name.
    widths = {c: len(c) + 2 for c in cols}
    first = max(len(g) for g in report.confusion) + 2
    lines.append("confusion (rows: gold, columns: predicted)")
    lines.append(f"{'':{first}}" + "".join(f"{c:>{widths[c]}}" for c in cols))
    for gold, counts in report.confusion.items():
        lines.append(f"{gold:{first}}" + "".join(f"{counts[c]:{widths[c]}d}" for c in cols))
    return "\n".join(lines)
