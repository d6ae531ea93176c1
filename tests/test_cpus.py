"""The CPUs a process may use: its cgroup's CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`) and
affinity, read from fake cgroup trees; and `--torch-threads` on the in-process commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moderation.cli import build_parser, main
from moderation.core.cpus import available_cpus, cpu_quota
from moderation.exit_codes import EXIT_OK, EXIT_USAGE

AFFINITY = len(os.sched_getaffinity(0))


def _v2(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for folder, value in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/kubepods/pod1/c1", {
        ".": "max 100000", "kubepods/pod1": "150000 100000", "kubepods/pod1/c1": "max 100000",
    })  # fmt: skip
    assert cpu_quota(root, proc) == 1.5
    assert available_cpus(root, proc) == 1  # 1.5 CPUs: one thread, never throttled
    root, proc = _v2(tmp_path / "b", "/", {".": "400000 100000"})
    assert cpu_quota(root, proc) == 4.0
    assert available_cpus(root, proc) == min(AFFINITY, 4)


def test_no_quota_means_the_affinity_mask(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/", {".": "max 100000"})
    assert cpu_quota(root, proc) is None
    assert available_cpus(root, proc) == AFFINITY
    assert available_cpus(tmp_path / "nothing", tmp_path / "none") == AFFINITY
    root, proc = _v2(tmp_path / "half", "/", {".": "50000 100000"})
    assert available_cpus(root, proc) == 1  # never below one


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text("200000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path, tmp_path / "absent") == 2.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path, tmp_path / "absent") is None
    # The process's own cpu cgroup (a job's), below an unlimited root.
    job = folder / "kubepods" / "job1"
    job.mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("50000\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/kubepods/job1\n0::/\n")
    assert cpu_quota(tmp_path, proc) == 0.5 and available_cpus(tmp_path, proc) == 1


@pytest.mark.parametrize("command", ["classify", "generate", "batch", "eval"])
def test_every_in_process_command_takes_torch_threads(command: str) -> None:
    args = {"classify": ["x"], "generate": ["x"], "batch": ["in.csv", "-o", "o.csv"],
            "eval": ["set.csv"]}[command]  # fmt: skip
    ns = build_parser().parse_args([command, "--torch-threads", "3", *args])
    assert ns.torch_threads == 3
    assert build_parser().parse_args([command, *args]).torch_threads == 0


def test_classify_runs_with_the_threads_asked_for(
    demo_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    try:
        code = main(["classify", "--model", str(demo_checkpoint), "--torch-threads", "1", "hi"])
        assert code == EXIT_OK and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["classify", "--torch-threads", "-1", "hi"])
    assert exc.value.code == EXIT_USAGE
    assert "--torch-threads" in capsys.readouterr().err
