"""`moderation eval --report DIR`: scikit-learn's curves and average precision equal this
project's own numbers, and the page with its figures is written (real engine, demo model)."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from moderation.cli import main
from moderation.core.decision import ClassifyItem
from moderation.core.thresholds import pr_curve
from moderation.exit_codes import EXIT_OK, EXIT_USAGE
from moderation.jobs import evaluate as evaluate_module
from moderation.jobs.datasets import Example
from moderation.jobs.metrics import average_precision, evaluate
from moderation.jobs.report import curves, reliability
from moderation.runtime import Runtime


def _random_set(seed: int, n: int = 300) -> tuple[list[float], list[bool]]:
    rng = random.Random(seed)
    positives = [rng.random() < 0.3 for _ in range(n)]
    # Two decimals: many ties, which both must admit together.
    scores = [round(min(1.0, max(0.0, rng.gauss(0.65 if p else 0.35, 0.2))), 2) for p in positives]
    return scores, positives


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sklearn_equals_our_average_precision_and_curve(seed: int) -> None:
    scores, positives = _random_set(seed)
    assert average_precision_score(positives, scores) == pytest.approx(
        average_precision(scores, positives), abs=1e-12
    )
    precision, recall, thresholds = precision_recall_curve(positives, scores)
    ours = pr_curve(scores, positives)  # highest threshold first
    theirs = list(zip(thresholds[::-1], precision[:-1][::-1], recall[:-1][::-1], strict=True))
    assert len(theirs) == len(ours)
    for point, (t, p, r) in zip(ours, theirs, strict=True):
        assert (point.threshold, point.precision, point.recall) == pytest.approx((t, p, r))


def _labelled(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    texts = [f"labelled text number {i}" for i in range(30)]
    labels = ["illegal_activities" if i % 3 == 0 else "unsafe" if i % 5 == 0 else "acceptable"
              for i in range(30)]  # fmt: skip
    data = tmp_path / "set.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))
    return data, texts, labels


def test_report_numbers_are_the_evaluations(tmp_path: Path, demo_runtime: Runtime) -> None:
    _, texts, labels = _labelled(tmp_path)
    examples = [Example(t, lab) for t, lab in zip(texts, labels, strict=True)]
    results = list(demo_runtime.classifier.classify_many([ClassifyItem(t) for t in texts]))
    report = evaluate(examples, results)
    found = {c.name: c for c in curves(examples, results, report)}
    assert found["unsafe"].average_precision == pytest.approx(report.auc_pr, abs=1e-12)
    assert found["unsafe"].decided == report.unsafe
    assert "illegal_activities" in found and "unqualified_advice" not in found  # no positives
    # The reliability bins: mean score and fraction harmful of each non-empty tenth.
    pairs = list(zip(examples, results, strict=True))
    predicted, observed = reliability(pairs)
    bins: dict[int, list[tuple[float, bool]]] = {}
    for e, r in pairs:
        bins.setdefault(min(int(r.unsafe_probability * 10), 9), []).append(
            (r.unsafe_probability, e.unsafe)
        )
    expected = [bins[k] for k in sorted(bins)]
    assert predicted == pytest.approx([sum(s for s, _ in b) / len(b) for b in expected])
    assert observed == pytest.approx([sum(u for _, u in b) / len(b) for b in expected])


def test_eval_report_writes_the_page_and_its_figures(
    tmp_path: Path, demo_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _, _ = _labelled(tmp_path)
    out = tmp_path / "report"
    code = main(["eval", str(data), "--model", str(demo_checkpoint), "--report", str(out),
                 "--target-recall", "0.5"])  # fmt: skip
    assert code == EXIT_OK, capsys.readouterr().err
    printed = capsys.readouterr()
    assert f"report written to {out / 'index.html'}" in printed.err
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert set(images) == {"pr-unsafe.png", "pr-illegal_activities.png", "confusion.png",
                           "scores.png", "reliability.png"}  # fmt: skip
    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table holds the numbers the terminal table prints.
    unsafe_row = next(line for line in printed.out.splitlines() if line.startswith("unsafe ("))
    precision, recall = unsafe_row.split()[2:4]
    assert f"<td>unsafe (flagged)</td><td>{precision}</td><td>{recall}</td>" in page
    assert f"<title>moderation eval: {data}</title>" in page


def test_a_missing_report_extra_is_named_before_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = evaluate_module.importlib.util.find_spec
    monkeypatch.setattr(
        evaluate_module.importlib.util, "find_spec",
        lambda name, *a: None if name == "sklearn" else real(name, *a),
    )  # fmt: skip
    # No such model or data: had it scored first, those would be the error.
    code = main(["eval", str(tmp_path / "absent.csv"), "--model", str(tmp_path / "none"),
                 "--report", str(tmp_path / "r")])  # fmt: skip
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--report needs the report extra (sklearn not installed)" in err
    assert "pip install '.[report]'" in err
