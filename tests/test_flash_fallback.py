"""A flash-attn that is installed but does not import (a wheel built for another torch or CUDA)
must not stop the engine: `auto` falls back to FlexAttention and says so once; `flash` names
the error.

torch.device("cuda") is only a descriptor, so the CUDA branch of the selection runs here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

import model.attention as attention
from model.attention import select_backend
from model.errors import EngineError
from model.flex import FlexBackend

CUDA = torch.device("cuda")
ABI_ERROR = "flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"


@pytest.fixture
def broken_flash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flash_attn package on sys.path whose import raises like an ABI-mismatched wheel."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise ImportError({ABI_ERROR!r})\n")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(attention, "_fallback_logged", False)


@pytest.mark.usefixtures("broken_flash")
def test_auto_falls_back_to_flex_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.attention"):
        backends = [select_backend("auto", CUDA, torch.bfloat16) for _ in range(3)]
    assert all(isinstance(b, FlexBackend) for b in backends)
    records = [r for r in caplog.records if r.name == "model.attention"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "using flex" in records[0].message and "undefined symbol" in records[0].message


@pytest.mark.usefixtures("broken_flash")
def test_explicit_flash_names_the_import_error() -> None:
    with pytest.raises(EngineError, match=r"'flash' is unavailable: .*ImportError.*undefined"):
        select_backend("flash", CUDA, torch.bfloat16)


def test_a_module_that_raises_something_else_at_import_also_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('built for CUDA 12.4, found 13.0')\n")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(attention, "_fallback_logged", False)
    assert isinstance(select_backend("auto", CUDA, torch.float16), FlexBackend)
    assert "RuntimeError: built for CUDA 12.4" in str(attention.flash_import_error())


def test_missing_flash_attn_is_not_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(attention, "_fallback_logged", False)
    with caplog.at_level(logging.INFO, logger="model.attention"):
        assert isinstance(select_backend("auto", CUDA, torch.bfloat16), FlexBackend)
    assert [r.levelno for r in caplog.records if r.name == "model.attention"] == [logging.INFO]
    with pytest.raises(EngineError, match="flash-attn is not installed"):
        select_backend("flash", CUDA, torch.bfloat16)
