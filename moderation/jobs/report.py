"""`moderation eval --report DIR`: the evaluation as an HTML page with figures.

DIR gets `index.html` and one PNG per figure: the precision-recall curve of P(not acceptable)
(unsafe texts as positives) and one per paper category (that category's probability, texts
labelled with it as positives), each with the operating point marked (the decisions as made,
and the calibrated point when `--target-precision`/`--target-recall` chose one); the confusion
matrix; histograms of P(not acceptable) for acceptable and harmful texts; a reliability
(calibration) diagram; and the table of figures. The curves, their average precision and the
reliability bins come from scikit-learn (`precision_recall_curve`, `average_precision_score`,
`calibration_curve`); tests/test_report.py checks them equal to this project's own numbers.

matplotlib and scikit-learn are the `report` extra: `moderation eval --report` says so when
they are missing, before any scoring.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moderation.core.decision import Classification
from moderation.core.policy import ACCEPTABLE_ID, PAPER_CATEGORY_IDS
from moderation.jobs.calibration import OVERALL, Calibration, distinct
from moderation.jobs.datasets import Example
from moderation.jobs.metrics import PRF, Report


@dataclass(frozen=True)
class Curve:
    """A precision-recall curve, its average precision, and where the decisions sit on it."""

    name: str
    precision: list[float]
    recall: list[float]
    average_precision: float
    decided: PRF  # the decisions as made
    chosen: tuple[float, float, float] | None  # calibrated (threshold, precision, recall)
    positives: int


def _scored(
    examples: Sequence[Example], results: Sequence[Classification | str]
) -> list[tuple[Example, Classification]]:
    return [(e, r) for e, r in zip(examples, results, strict=True) if not isinstance(r, str)]


def curves(
    examples: Sequence[Example],
    results: Sequence[Classification | str],
    report: Report,
    calibration: Calibration | None = None,
) -> list[Curve]:
    """The overall curve, then one per paper category that has positives in the set."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    pairs = _scored(examples, results)
    chosen = {OVERALL: calibration.overall} if calibration is not None else {}
    wanted: list[tuple[str, list[bool], list[float], PRF]] = [
        (OVERALL, [e.unsafe for e, _ in pairs], [r.unsafe_probability for _, r in pairs],
         report.unsafe),
    ]  # fmt: skip
    for cat in PAPER_CATEGORY_IDS:
        positives = [e.label == cat for e, _ in pairs]
        wanted.append((cat, positives, [r.paper_scores[cat] for _, r in pairs],
                       report.categories[cat]))  # fmt: skip
    out = []
    for name, positives, scores, decided in wanted:
        if not any(positives) or all(positives):
            continue  # no curve without both classes
        precision, recall, _ = precision_recall_curve(positives, scores)
        point = chosen.get(name)
        out.append(
            Curve(
                name=name,
                precision=[float(p) for p in precision],
                recall=[float(r) for r in recall],
                average_precision=float(average_precision_score(positives, scores)),
                decided=decided,
                chosen=None if point is None else (point.threshold, point.precision, point.recall),
                positives=sum(positives),
            )
        )
    return out


def _figure(path: Path, draw: Any, size: tuple[float, float] = (5.0, 4.0)) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(fig, ax)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path.name


def _pr_figure(curve: Curve, path: Path) -> str:
    def draw(fig: Any, ax: Any) -> None:
        ax.step(curve.recall, curve.precision, where="post", label="precision-recall")
        d = curve.decided
        ax.plot([d.recall], [d.precision], "o", color="tab:red", label="decisions as made")
        if curve.chosen is not None:
            threshold, p, r = curve.chosen
            shown = distinct([threshold])[0]  # 0.9999999995, not 1
            ax.plot([r], [p], "*", ms=12, color="tab:green", label=f"chosen ({shown})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
               title=f"{curve.name}: AP {curve.average_precision:.3f}")  # fmt: skip
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)

    return _figure(path, draw)


def _confusion_figure(report: Report, path: Path) -> str:
    cols = [ACCEPTABLE_ID, *PAPER_CATEGORY_IDS]
    rows = list(report.confusion)
    values = [[report.confusion[g][c] for c in cols] for g in rows]

    def draw(fig: Any, ax: Any) -> None:
        image = ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
        top = max((v for row in values for v in row), default=0)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center",
                        color="white" if top and v > top / 2 else "black", fontsize=8)  # fmt: skip
        ax.set(xlabel="predicted", ylabel="gold", title="confusion")
        fig.colorbar(image, ax=ax)

    return _figure(path, draw, size=(7.0, 5.0))


def _histogram_figure(pairs: list[tuple[Example, Classification]], path: Path) -> str:
    acceptable = [r.unsafe_probability for e, r in pairs if not e.unsafe]
    harmful = [r.unsafe_probability for e, r in pairs if e.unsafe]

    def draw(fig: Any, ax: Any) -> None:
        bins = [i / 20 for i in range(21)]
        ax.hist(acceptable, bins=bins, alpha=0.6, label=f"acceptable ({len(acceptable)})")
        ax.hist(harmful, bins=bins, alpha=0.6, label=f"harmful ({len(harmful)})")
        ax.set(xlabel="P(not acceptable)", ylabel="texts", title="scores by gold label")
        ax.legend(fontsize=8)

    return _figure(path, draw)


def reliability(
    pairs: list[tuple[Example, Classification]], bins: int = 10
) -> tuple[list[float], list[float]]:
    """(mean predicted P(not acceptable), fraction actually harmful) per non-empty bin."""
    from sklearn.calibration import calibration_curve

    truth = [e.unsafe for e, _ in pairs]
    if all(truth) or not any(truth):
        return [], []
    observed, predicted = calibration_curve(
        truth, [r.unsafe_probability for _, r in pairs], n_bins=bins
    )
    return [float(p) for p in predicted], [float(o) for o in observed]


def _reliability_figure(pairs: list[tuple[Example, Classification]], path: Path) -> str:
    predicted, observed = reliability(pairs)

    def draw(fig: Any, ax: Any) -> None:
        ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
        ax.plot(predicted, observed, "o-", label="this model")
        ax.set(xlabel="mean P(not acceptable)", ylabel="fraction harmful", xlim=(0, 1.02),
               ylim=(0, 1.02), title="reliability")  # fmt: skip
        ax.legend(fontsize=8)

    return _figure(path, draw)


def _table(report: Report, curves_: list[Curve]) -> str:
    ap = {c.name: c.average_precision for c in curves_}
    rows = [("unsafe (flagged)", report.unsafe, ap.get(OVERALL)),
            ("paper figure (acceptable positive)", report.paper_figure, None)]  # fmt: skip
    rows += [(cat, x, ap.get(cat)) for cat, x in report.categories.items()]
    cells = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{x.precision:.3f}</td><td>{x.recall:.3f}</td>"
        f"<td>{x.f1:.3f}</td><td>{x.support}</td>"
        f"<td>{'' if a is None else f'{a:.3f}'}</td></tr>"
        for name, x, a in rows
    )
    head = (
        "<tr><th></th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>AP</th></tr>"
    )
    return f"<table>{head}{cells}</table>"


def write_report(
    folder: str | Path,
    examples: Sequence[Example],
    results: Sequence[Classification | str],
    report: Report,
    *,
    title: str,
    calibration: Calibration | None = None,
) -> Path:
    """Write DIR/index.html and its figures; returns the page's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pairs = _scored(examples, results)
    found = curves(examples, results, report, calibration)
    figures = [(f"precision-recall: {c.name}", _pr_figure(c, out / f"pr-{c.name}.png"))
               for c in found]  # fmt: skip
    figures += [
        ("confusion matrix", _confusion_figure(report, out / "confusion.png")),
        ("scores of acceptable vs harmful texts", _histogram_figure(pairs, out / "scores.png")),
        ("reliability diagram", _reliability_figure(pairs, out / "reliability.png")),
    ]
    images = "".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, src in figures
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{report.n} examples, {report.failed} could not be scored; unsafe texts are the positives
(the paper's figure counts acceptable texts instead).</p>
{_table(report, found)}
{images}
</body></html>
"""
    page_path = out / "index.html"
    page_path.write_text(page, encoding="utf-8")
    return page_path
