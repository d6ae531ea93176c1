"""Count what one engine step costs the host: aten ops (each one kernel launch on a GPU, views
aside) and the points where a GPU step would wait for the device.

On CUDA a step that synchronises cannot run ahead of the GPU, nor be captured in a CUDA graph.
This machine may have no GPU, so besides the ops that synchronise wherever they run
(`.item()`, `nonzero`, ...) the counter also flags what *would* synchronise on CUDA: host data
turned into a tensor with an explicit device (`torch.tensor(xs, device=d)` is a blocking copy),
a blocking `.to(device)` of a host tensor, and `.tolist()`. Host-to-device copies made through
`model.transfer.upload` (one non-blocking copy from pinned memory) are counted apart, as
transfers. Works the same on CUDA, so a GPU check can call it.

    with StepCounter() as counts:
        engine.step()
    counts.syncs, counts.transfers, counts.ops
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import transfer

aten = torch.ops.aten
# Ops whose result size or value the host must read before it can go on.
_ALWAYS_SYNC = {
    aten._local_scalar_dense.default,  # .item(), int(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
}


class StepCounter(TorchDispatchMode):
    """Counts aten ops, host syncs (real or would-be on CUDA) and pinned transfers."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0  # aten ops that compute (views excluded): ~ kernel launches on a GPU
        self.views = 0
        self.syncs = 0
        self.transfers = 0
        self.sync_reasons: Counter[str] = Counter()
        self.op_names: Counter[str] = Counter()
        self._quiet = 0  # inside upload() or a counted tolist(): don't count its pieces
        self._saved: list[tuple[Any, str, Any]] = []

    # ---------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func.is_view:
            self.views += 1
        else:
            self.ops += 1
            self.op_names[str(func.overloadpacket.__name__)] += 1
        if not self._quiet:
            reason = self._sync_reason(func, args, kwargs)
            if reason:
                self._sync(reason)
        return func(*args, **kwargs)

    @staticmethod
    def _sync_reason(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if func in _ALWAYS_SYNC:
            return str(func.overloadpacket.__name__)
        name = func.overloadpacket.__name__
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            for idx in args[1]:
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                    return f"{name} with a bool mask"
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_device = args[0].device if name == "copy_" else kwargs.get("device")
            if (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and dst_device is not None
                and torch.device(dst_device).type == "cpu"
            ):
                return "device-to-host copy"
        return None

    def _sync(self, reason: str) -> None:
        self.syncs += 1
        self.sync_reasons[reason] += 1

    # ---------------------------------------------------------- python-level

    def __enter__(self) -> StepCounter:
        counter = self
        real_tensor, real_as_tensor = torch.tensor, torch.as_tensor
        real_to, real_tolist = torch.Tensor.to, torch.Tensor.tolist
        real_upload = transfer.upload

        def tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not counter._quiet and kwargs.get("device") is not None:
                counter._sync("torch.tensor(host data, device=...)")
            return real_tensor(*args, **kwargs)

        def as_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not counter._quiet and kwargs.get("device") is not None:
                counter._sync("torch.as_tensor(host data, device=...)")
            return real_as_tensor(*args, **kwargs)

        def to(self_: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            device = kwargs.get("device")
            if device is None and args and isinstance(args[0], (str, torch.device)):
                device = args[0]
            if (
                not counter._quiet
                and device is not None
                and self_.device.type == "cpu"
                and not kwargs.get("non_blocking", False)
            ):
                counter._sync("blocking .to(device) of a host tensor")
            return real_to(self_, *args, **kwargs)

        def tolist(self_: torch.Tensor) -> Any:
            if not counter._quiet:
                counter._sync("tolist")
            counter._quiet += 1
            try:
                return real_tolist(self_)
            finally:
                counter._quiet -= 1

        def upload(*args: Any, **kwargs: Any) -> Any:
            counter.transfers += 1
            counter._quiet += 1
            try:
                return real_upload(*args, **kwargs)
            finally:
                counter._quiet -= 1

        self._saved = [
            (torch, "tensor", real_tensor),
            (torch, "as_tensor", real_as_tensor),
            (torch.Tensor, "to", real_to),
            (torch.Tensor, "tolist", real_tolist),
            (transfer, "upload", real_upload),
        ]
        torch.tensor = tensor  # type: ignore[assignment]
        torch.as_tensor = as_tensor  # type: ignore[assignment]
        torch.Tensor.to = to  # type: ignore[method-assign,assignment]
        torch.Tensor.tolist = tolist  # type: ignore[method-assign,assignment]
        transfer.upload = upload  # type: ignore[assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        self._saved = []
