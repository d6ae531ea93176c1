"""`moderation eval`: how well the classifier does on a labelled set; the metrics and what
each counts are in moderation.jobs.metrics."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

from moderation.api.remote import RemoteError
from moderation.core.decision import ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.policy import PolicyError
from moderation.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from moderation.extras import REPORT_MODULES, install_hint
from moderation.jobs.calibration import Target, calibrate, calibration_table
from moderation.jobs.datasets import DatasetError, read_dataset
from moderation.jobs.metrics import evaluate, table
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
    if ns.report is not None:
        missing = [m for m in REPORT_MODULES if importlib.util.find_spec(m) is None]
        if missing:  # before minutes of scoring
            print(
                f"moderation eval: error: --report needs the report extra ({missing[0]} not "
                f"installed): {install_hint('report')}",
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
            reporter.start_timer()
            for start in range(0, len(items), ns.batch_size):
                results.extend(scorer.score(items[start : start + ns.batch_size]))
                reporter.update(len(results), len(results) / max(len(items), 1))
            reporter.finish()
        finally:
            reporter.stop_timer()
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
    if ns.report is not None:
        from moderation.jobs.report import write_report

        try:
            page = write_report(ns.report, examples, results, report, calibration=calibration,
                                title=f"moderation eval: {ns.file}")  # fmt: skip
        except OSError as exc:
            print(f"moderation eval: error: --report: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"report written to {page}", file=sys.stderr)
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
    add_policy_option(p, None, remote=True)
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
    add_long_text_option(p, "reject")  # as every command: a long text is the caller's choice
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=64, help="texts per engine pass")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="also write an HTML page with figures to DIR (index.html): precision-recall "
        "curves, confusion matrix, score histograms, reliability; needs the report extra",
    )
    add_model_options(p)
    add_remote_options(p)
    p.set_defaults(func=_run)
