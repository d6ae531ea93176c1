"""Conversations in the commands: `moderation classify --messages FILE.json` and `moderation
batch --messages-column NAME`, end to end with the real engine on the demo checkpoint, in
process and against a real server (remote mode)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moderation.api.remote import RemoteOptions, RemoteScorer
from moderation.cli import main
from moderation.core.chat import chat_messages
from moderation.core.decision import ClassifyItem
from moderation.exit_codes import EXIT_FAILED_ROWS, EXIT_OK, EXIT_USAGE
from moderation.jobs.batch import BatchJob, run
from moderation.jobs.scoring import LocalScorer
from moderation.serving.settings import ServeSettings
from tests.servers import InProcessServer, demo_loader, free_port

CONVERSATION = [
    {"role": "system", "content": "You are a baker."},
    {"role": "user", "content": "Bread?"},
    {"role": "assistant", "content": "Knead it, then bake it."},
]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == EXIT_OK else {}), err


def write_json(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_classify_messages_prints_the_decision_of_the_last_message(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path, demo_runtime: Any, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "conv.json", CONVERSATION)
    model = ("--model", str(demo_checkpoint))
    code, got, _ = run_cli(capsys, "classify", *model, "--policy", "mistral-13", "--messages", path)
    assert code == EXIT_OK
    want = demo_runtime.classifier.classify(
        messages=chat_messages(CONVERSATION), policy="mistral-13"
    )
    assert got == json.loads(json.dumps(want.to_dict()))
    assert got["context_tokens"] > 0 and got["context_messages_dropped"] == 0
    # A user and answer pair is the answer with its prompt, from the command line too.
    pair = write_json(tmp_path / "pair.json", CONVERSATION[1:])
    _, from_pair, _ = run_cli(capsys, "classify", *model, "--messages", pair)
    _, from_text, _ = run_cli(
        capsys, "classify", *model, "--role", "output", "--prompt", "Bread?",
        "Knead it, then bake it.",
    )  # fmt: skip
    assert from_pair == from_text


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, (), "cannot read"),
        ("[{]", (), "not valid JSON"),
        ('{"messages": []}', (), "expected a JSON list of messages, got a object"),
        ('["hi"]', (), "messages[0]: expected an object with role and content"),
        ('[{"role": "user"}]', (), "messages[0].content: must be a string"),
        ("[]", (), "messages: must not be empty"),
        ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', (),
         "messages[1].role: expected 'assistant'"),
        ('[{"role": "user", "content": "   "}]', (), "messages[0].content: must not be empty"),
        ('[{"role": "user", "content": "a"}]', ("--role", "output"), "--role does not go"),
        ('[{"role": "user", "content": "a"}]', ("--prompt", "p"), "--prompt does not go"),
        ('[{"role": "user", "content": "a"}]', ("a text",), "not both"),
    ],
)  # fmt: skip
def test_classify_bad_messages_files_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str],
    demo_checkpoint: Path,
    tmp_path: Path,
    content: str | None,
    extra: tuple[str, ...],
    message: str,
) -> None:
    path = tmp_path / "conv.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, _, err = run_cli(
        capsys, "classify", "--model", str(demo_checkpoint), "--messages", str(path), *extra
    )
    assert code == EXIT_USAGE
    assert err.splitlines()[-1].startswith("moderation classify: error: ") and message in err
    code, _, err = run_cli(capsys, "classify", "--model", str(demo_checkpoint))
    assert code == EXIT_USAGE and "give a text to classify, or --messages FILE.json" in err


def conversations_csv(path: Path) -> list[str]:
    """A CSV with a conversation column: good cells, and every kind of bad one."""
    cells = [
        json.dumps(CONVERSATION),
        json.dumps(CONVERSATION[1:2]),
        "not json",
        "",
        json.dumps({"role": "user", "content": "an object, not a list"}),
        json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        json.dumps([*CONVERSATION, {"role": "user", "content": "And cake?"}]),
    ]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "conv"])
        for i, cell in enumerate(cells):
            writer.writerow([str(i), cell])
    return cells


def read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def job(inp: Path, out: Path) -> BatchJob:
    return BatchJob(
        input=str(inp), output=str(out), text_column=None, prompt_column=None, role="input",
        policy=None, threshold=None, encoding="utf-8-sig", delimiter=",", batch_size=3,
        resume=False, escape_formulas=False, messages_column="conv",
    )  # fmt: skip


def check_rows(rows: list[dict[str, str]], cells: list[str], runtime: Any) -> None:
    assert [r["id"] for r in rows] == [str(i) for i in range(len(cells))]
    assert [r["conv"] for r in rows] == cells  # copied unchanged
    errors = [r["error"] for r in rows]
    assert errors[0] == errors[1] == errors[6] == ""
    assert errors[2].startswith("messages: not valid JSON")
    assert errors[3].startswith("messages: not valid JSON")
    assert errors[4].startswith("messages: expected a JSON list")
    assert errors[5].startswith("messages[1].role: expected 'assistant'")
    for i in (0, 1, 6):
        want = runtime.classifier.classify(messages=chat_messages(json.loads(cells[i])))
        assert rows[i]["category"] == want.category
        assert float(rows[i]["score_acceptable"]) == pytest.approx(
            want.scores["acceptable"], abs=2e-6
        )
        assert int(rows[i]["context_tokens"]) == want.context_tokens
        assert int(rows[i]["context_messages_dropped"]) == want.context_messages_dropped
    assert int(rows[1]["context_tokens"]) == 0 and int(rows[6]["context_tokens"]) > 0


def test_batch_scores_a_column_of_conversations_and_accounts_for_bad_cells(
    tmp_path: Path, demo_runtime: Any
) -> None:
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    cells = conversations_csv(inp)
    progress = run(job(inp, out), LocalScorer(demo_runtime))
    assert (progress.rows, progress.failed) == (7, 4)
    rows = read(out)
    assert list(rows[0])[-3:] == ["context_tokens", "context_messages_dropped", "error"]
    check_rows(rows, cells, demo_runtime)


def test_batch_command_with_a_messages_column(
    tmp_path: Path, demo_checkpoint: Path, demo_runtime: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    cells = conversations_csv(inp)
    base = ["batch", str(inp), "-o", str(out), "--model", str(demo_checkpoint)]
    assert main([*base, "--messages-column", "conv"]) == EXIT_FAILED_ROWS
    assert "7 rows: 3 scored, 4 failed" in capsys.readouterr().err
    check_rows(read(out), cells, demo_runtime)
    for args, message in [
        (["--messages-column", "conv", "--text-column", "id"], "one of --text-column"),
        ([], "one of --text-column"),
        (["--messages-column", "conv", "--role", "output"], "--role does not go"),
        (["--messages-column", "conv", "--prompt-column", "id"], "--prompt-column does not go"),
        (["--messages-column", "nope"], "no column 'nope'"),
    ]:
        assert main([*base, *args]) == EXIT_USAGE
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    settings = ServeSettings(model_process=False,
        host="127.0.0.1", port=free_port(), metrics_port=free_port(),
    )  # fmt: skip
    served = InProcessServer(settings, demo_loader(demo_checkpoint))
    served.wait_loaded()
    yield served
    served.stop()


def test_batch_remote_mode_sends_the_conversations(
    tmp_path: Path, demo_runtime: Any, server: InProcessServer
) -> None:
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    cells = conversations_csv(inp)
    remote = RemoteScorer(RemoteOptions(targets=(server.address,), chunk=4))
    try:
        progress = run(job(inp, out), remote)
        # A conversation the server refuses comes back as that row's error, the rest scored.
        results = remote.score(
            [
                ClassifyItem(messages=chat_messages(CONVERSATION)),
                ClassifyItem(messages=chat_messages(CONVERSATION[:1])),
            ]
        )
    finally:
        remote.close()
    assert (progress.rows, progress.failed) == (7, 4)
    check_rows(read(out), cells, demo_runtime)
    assert not isinstance(results[0], str) and results[0].context_tokens > 0
    assert isinstance(results[1], str) and "must end with a user or assistant" in results[1]
