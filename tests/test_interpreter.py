"""The server's processes freeze their start-up objects and shorten the GIL switch interval
(moderation.serving.interpreter): run in a fresh interpreter so pytest's own state is untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.servers import REPO


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_front_process_freezes_start_up_objects_and_switches_the_gil_sooner() -> None:
    out = run_python(
        """
        import gc, sys
        import grpc, torch  # what the server imports before it serves
        from moderation.serving import interpreter
        assert gc.get_freeze_count() == 0
        frozen = interpreter.tune_front_process()
        print(frozen, gc.get_freeze_count(), sys.getswitchinterval())
        """
    )
    frozen, count, interval = out.split()
    assert int(frozen) == int(count) > 50_000  # torch alone leaves far more than this
    assert float(interval) == 0.0005


def test_garbage_made_after_the_freeze_is_still_collected() -> None:
    out = run_python(
        """
        import gc, weakref
        from moderation.serving import interpreter
        interpreter.freeze_start_up_objects()
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        print(alive() is None)
        """
    )
    assert out == "True"
