"""Operating points: thresholds chosen for a target precision or recall on labelled data, the
thresholds file, and `serve`, `classify`, `batch` using it."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import grpc
import pytest

from moderation.cli import main
from moderation.core.decision import Classification, ClassifyItem, decide
from moderation.core.planning import Planner
from moderation.core.thresholds import (
    OperatingPoint,
    ThresholdsError,
    choose_point,
    load_operating_point,
    parse_operating_point,
    pr_curve,
)
from moderation.exit_codes import EXIT_OK, EXIT_USAGE
from moderation.jobs.calibration import (
    Calibration,
    Target,
    calibrate,
    calibration_table,
    distinct,
)
from moderation.jobs.datasets import Example
from moderation.runtime import Runtime, load
from moderation.serving.settings import settings_from_env

# Ten scores, highest first, with their gold labels. On this curve (score >= t flags):
#   t     .95  .9   .8   .7   .6   .5   .4   .3   .2   .1
#   P     1    1    .67  .75  .8   .67  .71  .62  .56  .5
#   R     .2   .4   .4   .6   .8   .8   1    1    1    1
SCORES = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
LABELS = [True, True, False, True, True, False, True, False, False, False]


@pytest.mark.parametrize(
    ("target", "threshold", "precision", "recall"),
    [
        ({"target_precision": 0.8}, 0.6, 0.8, 0.8),  # the most recall at precision >= 0.8
        ({"target_precision": 1.0}, 0.9, 1.0, 0.4),
        ({"target_precision": 0.7}, 0.4, 5 / 7, 1.0),
        ({"target_recall": 1.0}, 0.4, 5 / 7, 1.0),  # the most precision at recall 1
        ({"target_recall": 0.6}, 0.6, 0.8, 0.8),
        ({"target_recall": 0.2}, 0.9, 1.0, 0.4),  # precision ties: the higher recall
    ],
)
def test_chosen_threshold_is_the_known_optimum(
    target: dict[str, float], threshold: float, precision: float, recall: float
) -> None:
    point = choose_point(SCORES, LABELS, **target)
    assert point.threshold == threshold
    assert point.precision == pytest.approx(precision)
    assert point.recall == pytest.approx(recall)
    # The point is what flagging score >= threshold gives, counted by hand.
    flagged = [s >= point.threshold for s in SCORES]
    tp = sum(f and g for f, g in zip(flagged, LABELS, strict=True))
    assert tp / sum(flagged) == pytest.approx(point.precision)
    assert tp / sum(LABELS) == pytest.approx(point.recall)


def test_ties_are_admitted_together_and_unreachable_targets_say_so() -> None:
    curve = pr_curve([0.5, 0.5, 0.2], [True, False, True])
    assert [(p.threshold, p.tp, p.fp) for p in curve] == [(0.5, 1, 1), (0.2, 2, 1)]
    with pytest.raises(ThresholdsError, match=r"no threshold reaches precision 0\.9"):
        choose_point([0.9, 0.1], [False, True], target_precision=0.9)
    with pytest.raises(ThresholdsError, match="no positive"):
        choose_point([0.9, 0.1], [False, False], target_recall=0.5)


def _result(runtime: Runtime, scores: dict[str, float]) -> Classification:
    """The decision for given probabilities (logprobs in the policy's order, acceptable last)."""
    policy = runtime.classifier.policy("paper")
    logprobs = [math.log(scores[c]) for c in (*policy.category_ids, "acceptable")]
    return decide(
        policy, logprobs, threshold=0.5, category_thresholds={}, model_id="m", prompt_tokens=1
    )


def test_per_category_calibration_on_constructed_scores(demo_runtime: Runtime) -> None:
    # Illegal texts score high on illegal_activities, hateful ones on hateful_...; the optimum
    # per category at precision 1 is the lowest score of that category's positives.
    ill, hate = "illegal_activities", "hateful_harassing_violent"
    rows = [
        (ill, {ill: 0.9, hate: 0.02}),
        (ill, {ill: 0.6, hate: 0.1}),
        (hate, {ill: 0.2, hate: 0.7}),
        ("acceptable", {ill: 0.2, hate: 0.5}),
        ("acceptable", {ill: 0.05, hate: 0.05}),
        ("unsafe", {ill: 0.1, hate: 0.1}),
    ]  # fmt: skip
    examples, results = [], []
    for label, s in rows:
        rest = 1.0 - sum(s.values())
        scores = {**s, "unqualified_advice": rest / 2, "acceptable": rest / 2}
        examples.append(Example("t", label))
        results.append(_result(demo_runtime, scores))
    policy = demo_runtime.classifier.policy("paper")
    c = calibrate(examples, results, policy, Target("precision", 1.0), per_category=True)
    assert c.categories["illegal_activities"].threshold == pytest.approx(0.6)
    assert c.categories["hateful_harassing_violent"].threshold == pytest.approx(0.7)
    assert c.uncalibrated == ["unqualified_advice"]  # no positives in the set
    data = c.file_data("set.csv", len(examples))
    assert data["threshold"] is None
    assert data["thresholds"]["unqualified_advice"] == c.overall.threshold
    point = parse_operating_point(json.loads(json.dumps(data)))
    assert point.category_thresholds["illegal_activities"] == pytest.approx(0.6)


def test_planner_uses_the_policys_operating_point_unless_the_request_sets_its_own(
    demo_runtime: Runtime,
) -> None:
    base = demo_runtime.planner
    points = {
        "paper": OperatingPoint("paper", threshold=0.3),
        "mistral-13": OperatingPoint("mistral-13", category_thresholds={"malware": 0.2}),
    }
    planner = Planner(base.tokenizer, base.limits, operating_points=points)
    assert planner.plan(ClassifyItem("hi")).threshold == 0.3
    assert planner.plan(ClassifyItem("hi", threshold=0.9)).threshold == 0.9
    planned = planner.plan(ClassifyItem("hi", policy="mistral-13"))
    assert planned.category_thresholds == {"malware": 0.2}
    own = planner.plan(ClassifyItem("hi", policy="mistral-13", category_thresholds={"fraud": 0.4}))
    assert own.category_thresholds == {"fraud": 0.4}
    with pytest.raises(ThresholdsError, match="no category 'malware'"):
        Planner(
            base.tokenizer,
            base.limits,
            operating_points={"paper": OperatingPoint("paper", category_thresholds={"malware": 1})},
        )


def test_eval_writes_thresholds_that_classify_batch_and_serve_use(
    tmp_path: Path,
    demo_checkpoint: Path,
    demo_runtime: Runtime,
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = [f"labelled text number {i}" for i in range(24)]
    labels = ["unsafe" if i % 3 == 0 else "acceptable" for i in range(24)]
    data = tmp_path / "set.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))
    out = tmp_path / "thresholds.json"
    model = ["--model", str(demo_checkpoint)]
    code = main(["eval", str(data), *model, "--target-recall", "0.75",
                 "--write-thresholds", str(out)])  # fmt: skip
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "<- chosen" in printed
    # The file holds the optimum of the model's own scores on the set.
    results = demo_runtime.classifier.classify_many([ClassifyItem(t) for t in texts])
    expected = choose_point(
        [r.unsafe_probability for r in results], [lab == "unsafe" for lab in labels],
        target_recall=0.75,
    )  # fmt: skip
    written = json.loads(out.read_text())
    assert written["policy"] == "paper" and written["target"] == {"recall": 0.75}
    assert written["threshold"] == pytest.approx(expected.threshold, abs=1e-6)
    t = written["threshold"]

    assert main(["classify", *model, "--thresholds", str(out), texts[0]]) == EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["flagged"] == (1 - got["scores"]["acceptable"] >= t)

    scored = tmp_path / "scored.csv"
    code = main(["batch", str(data), "-o", str(scored), "--text-column", "text", *model,
                 "--thresholds", str(out)])  # fmt: skip
    assert code == EXIT_OK
    with open(scored, newline="") as f:
        rows = list(csv.DictReader(f))
    flagged = [r["flagged"] == "true" for r in rows]
    assert flagged == [r.unsafe_probability >= t for r in results]
    assert sum(flagged) >= 6  # recall >= 0.75 of the 8 unsafe texts

    # A target the model cannot reach: the metrics are still printed, and no file is written.
    missing = tmp_path / "unreachable.json"
    code = main(["eval", str(data), *model, "--target-precision", "1.0", "--write-thresholds",
                 str(missing)])  # fmt: skip
    if code == EXIT_USAGE:  # (random weights may, by chance, reach it)
        captured = capsys.readouterr()
        assert "no threshold reaches precision 1.0" in captured.err
        assert "area under the precision-recall curve" in captured.out
        assert not missing.exists()
    capsys.readouterr()
    assert main(["classify", *model, "--thresholds", str(out), "--policy", "mistral-13", "x"]) == (
        EXIT_USAGE
    )
    assert "not 'mistral-13'" in capsys.readouterr().err

    settings = settings_from_env({"MODERATION_THRESHOLDS": str(out),
                                  "MODERATION_MODEL": str(demo_checkpoint)})  # fmt: skip
    assert settings.thresholds == (str(out),)
    runtime = load(settings.runtime_settings())
    assert runtime.planner.operating_points["paper"].threshold == pytest.approx(t)


@pytest.mark.parametrize(
    "content",
    [
        "[" * 200_000 + "]" * 200_000,  # nested past Python's decoder
        '{"policy": "paper", "threshold": ' + "9" * 5000 + "}",  # past int's 4,300 digits
        '{"policy": "paper", "threshold": "' + "x" * 100_000 + '"}',
        '{"policy": "paper", "thresholds": {"' + "k" * 100_000 + '": 2}}',
        '{"policy": "paper", "thresholds": [0.5]}',
        '{"policy": ["paper"]}',
        "[]",
        "\xff",
        "",
    ],
)
def test_a_thresholds_file_of_any_shape_is_one_short_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(ThresholdsError) as err:
        load_operating_point(path)
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)


def test_distinct_prints_thresholds_near_one_apart() -> None:
    shown = distinct([0.99991, 0.99997, 0.5, 0.99997])
    assert shown[0] != shown[1] and shown[1] == shown[3]
    assert float(shown[0]) == pytest.approx(0.99991) and shown[2] == "0.5"
    assert distinct([0.25, 0.125]) == ["0.25", "0.125"]


def test_calibration_table_tells_thresholds_under_one_apart() -> None:
    # A trained model's scores crowd just under 1: four digits would print them all as `1`.
    scores = [1 - 1e-5 * k for k in range(1, 9)]
    positives = [True, True, True, False, True, False, False, False]
    examples = [Example(f"t{i}", "unsafe" if p else "acceptable") for i, p in enumerate(positives)]
    c = Calibration(
        "paper", Target("recall", 0.5), choose_point(scores, positives, target_recall=0.5), {},
        [], {"unsafe": pr_curve(scores, positives)},
    )  # fmt: skip
    rows = [line.split()[0] for line in calibration_table(c).splitlines()[3:] if line.strip()]
    assert len(rows) == len(examples) and len(set(rows)) == len(rows)
    assert "1" not in rows and rows[0] == "0.99999"


def test_the_live_thresholds_are_in_model_info_the_log_and_a_gauge(
    tmp_path: Path, demo_checkpoint: Path
) -> None:
    from structlog.testing import capture_logs

    from moderation.serving.logs import configure_logging
    from moderation.v1 import moderation_pb2 as pb
    from moderation.v1 import moderation_pb2_grpc as pb_grpc
    from tests.servers import InProcessServer, demo_loader, free_port

    path = tmp_path / "mistral.json"
    path.write_text(json.dumps({"policy": "mistral-13", "thresholds": {"malware": 0.25}}))
    settings = settings_from_env({"MODERATION_THRESHOLDS": str(path),
                                  "MODERATION_THRESHOLD": "0.625"})  # fmt: skip
    settings = dataclasses.replace(
        settings, host="127.0.0.1", port=free_port(), model_process=False
    )
    configure_logging("info")  # an earlier command may have left it at warning
    with capture_logs() as logs:
        server = InProcessServer(settings, demo_loader(demo_checkpoint))
        try:
            server.wait_loaded()
            stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            get = server.server.metrics.registry.get_sample_value
            gauges = {
                (p, c): get("moderation_threshold", {"policy": p, "category": c, "source": s})
                for p, c, s in (("paper", "unsafe", "MODERATION_THRESHOLD"),
                                ("mistral-13", "malware", str(path)),
                                ("mistral-13", "unsafe", str(path)))
            }  # fmt: skip
        finally:
            server.stop()
    assert info.default_threshold == pytest.approx(0.625)
    policies = {p.name: p for p in info.policies}
    paper, mistral = policies["paper"], policies["mistral-13"]
    assert paper.threshold == pytest.approx(0.625) and not paper.category_thresholds
    assert paper.thresholds_source == "MODERATION_THRESHOLD"
    assert dict(mistral.category_thresholds) == {"malware": pytest.approx(0.25)}
    assert mistral.thresholds_source == str(path)
    assert gauges == {("paper", "unsafe"): 0.625, ("mistral-13", "malware"): 0.25,
                      ("mistral-13", "unsafe"): None}  # fmt: skip
    lines = {e["policy"]: e for e in logs if e["event"] == "thresholds"}
    assert lines["mistral-13"]["category_thresholds"] == {"malware": 0.25}
    assert lines["paper"]["threshold"] == 0.625 and lines["paper"]["source"] == (
        "MODERATION_THRESHOLD"
    )
