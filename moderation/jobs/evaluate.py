"""`moderation eval`: how well the classifier does on a labelled set.

Metrics, all from the same predictions:
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

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moderation.api.remote import RemoteError
from moderation.core.decision import Classification, ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.policy import ACCEPTABLE_ID, PAPER_CATEGORY_IDS, PolicyError
from moderation.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from moderation.jobs.calibration import Target, calibrate, calibration_table
from moderation.jobs.datasets import UNSAFE, DatasetError, Example, read_dataset
from moderation.jobs.options import (
    add_long_text_option,
    add_model_options,
    add_policy_option,
    add_remote_options,
    add_threshold_options,
    policy_option,
    threshold_options,
)
from moderation.jobs.progress import DEFAULT_INTERVAL, ProgressReporter
from moderation.jobs.scoring import make_scorer


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
    short = {c: c[:12] for c in cols}
    lines.append("confusion (rows: gold, columns: predicted)")
    lines.append(f"{'':28}" + "".join(f"{short[c]:>14}" for c in cols))
    for gold, counts in report.confusion.items():
        lines.append(f"{gold:28}" + "".join(f"{counts[c]:14d}" for c in cols))
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    target = None
    if ns.target_precision is not None or ns.target_recall is not None:
        measure = "precision" if ns.target_precision is not None else "recall"
        target = Target(measure, ns.target_precision or ns.target_recall or 0.0)
        if not 0.0 < target.value <= 1.0:
            print(f"moderation eval: error: --target-{measure} must be in (0, 1]", file=sys.stderr)
            return EXIT_USAGE
    elif ns.per_category or ns.write_thresholds:
        print(
            "moderation eval: error: --per-category and --write-thresholds need "
            "--target-precision or --target-recall",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        policy, policy_files = policy_option(ns.policy, remote=bool(ns.target))
        policy, thresholds = threshold_options(ns, policy)
        examples = read_dataset(
            ns.file, ns.format, text_column=ns.text_column, label_column=ns.label_column
        )
        if ns.limit:
            examples = examples[: ns.limit]
        scorer = make_scorer(ns, policy_files)
        reporter = ProgressReporter(
            sys.stderr, name="eval", unit="texts", interval=ns.progress_interval
        )
        try:
            resolved = scorer.policy(policy)
            items = [ClassifyItem(e.text, policy=policy, **thresholds) for e in examples]
            results = []
            reporter.started(0)
            for start in range(0, len(items), ns.batch_size):
                results.extend(scorer.score(items[start : start + ns.batch_size]))
                reporter.update(len(results), len(results) / max(len(items), 1))
            reporter.finish()
        finally:
            scorer.close()
    except (DatasetError, InvalidArgument, PolicyError, OSError) as exc:
        print(f"moderation eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteError as exc:  # the servers are out of reach: as `batch` says it
        print(f"moderation eval: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    report = evaluate(examples, results)
    calibration = None
    if target is not None:
        try:
            calibration = calibrate(
                examples, results, resolved, target, per_category=ns.per_category
            )
        except PolicyError as exc:  # the target is out of reach: the metrics still count
            print(json.dumps(report.to_dict(), indent=2) if ns.json else table(report))
            print(f"moderation eval: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if ns.json:
        data = report.to_dict()
        if calibration is not None:
            data["operating_point"] = calibration.file_data(ns.file, len(examples))
        print(json.dumps(data, indent=2))
    else:
        print(table(report))
        if calibration is not None:
            print()
            print(calibration_table(calibration))
    if calibration is not None and ns.write_thresholds:
        try:
            calibration.write(ns.write_thresholds, ns.file, len(examples))
        except OSError as exc:
            print(f"moderation eval: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"thresholds written to {ns.write_thresholds}", file=sys.stderr)
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the `eval` subcommand."""
    p = sub.add_parser("eval", help="metrics of the classifier on a labelled set")
    p.add_argument("file", help="labelled file: OpenAI samples (.jsonl[.gz]), XSTest CSV, or CSV")
    p.add_argument("--format", default="auto", choices=("auto", "openai", "xstest", "csv"))
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    add_policy_option(p, None)
    add_threshold_options(p)
    goal = p.add_mutually_exclusive_group()
    goal.add_argument(
        "--target-precision",
        type=float,
        metavar="P",
        help="choose the threshold with the highest recall at precision >= P (unsafe positive)",
    )
    goal.add_argument(
        "--target-recall",
        type=float,
        metavar="R",
        help="choose the threshold with the highest precision at recall >= R",
    )
    p.add_argument(
        "--per-category",
        action="store_true",
        help="one threshold per category of the policy (on its probability) instead of one "
        "on P(not acceptable)",
    )
    p.add_argument(
        "--write-thresholds",
        metavar="FILE",
        help="write the chosen thresholds, for serve/classify/batch --thresholds FILE",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"off a terminal, a progress line every SECONDS (0: none; default "
        f"{DEFAULT_INTERVAL:g}); a terminal gets a bar",
    )
    add_long_text_option(p, "split")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=64, help="texts per engine pass")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_options(p)
    add_remote_options(p)
    p.set_defaults(func=_run)
