"""Regenerate the committed gRPC code in moderation/v1/ from protos/.

Usage (from anywhere): ``python protos/generate.py [--out DIR]``.

Runs exactly::

    python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/moderation/v1/moderation.proto

from the repository root (with ``.`` replaced by ``--out`` when given), so the output is the
same as running that command by hand. The output depends on the grpcio-tools version, which is
pinned in pyproject's dev extra; tests/test_proto_fresh.py fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = "protos"
PROTO_FILES = ("protos/moderation/v1/moderation.proto",)
# Files protoc writes for each proto, relative to the output directory.
GENERATED_FILES = (
    "moderation/v1/moderation_pb2.py",
    "moderation/v1/moderation_pb2.pyi",
    "moderation/v1/moderation_pb2_grpc.py",
)


def protoc_command(out: str = ".") -> list[str]:
    """The protoc invocation, to be run with the repository root as working directory."""
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]


def generate(out: Path | None = None) -> list[Path]:
    """Run protoc into ``out`` (default: the repository root); return the files written."""
    target = REPO_ROOT if out is None else out.resolve()
    # protoc does not create the package folders itself.
    for rel in GENERATED_FILES:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
    # A relative "." keeps the committed invocation byte-for-byte what the docstring shows.
    out_arg = "." if out is None else str(target)
    subprocess.run(protoc_command(out_arg), cwd=REPO_ROOT, check=True)
    return [target / rel for rel in GENERATED_FILES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the repository root, i.e. the committed files)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
