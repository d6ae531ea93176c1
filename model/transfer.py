"""The one way a pass's host-side integers reach the device.

Every index a forward pass needs (tokens, positions, cache rows, ...) is built on the host and
copied in one transfer: on CUDA from pinned memory with non_blocking=True, so the host does not
wait for the GPU and the copy can precede a captured or compiled step. A `torch.tensor(xs,
device=cuda)` per index would be a blocking copy each (bench/step_counts.py counts them).
"""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`: one non-blocking copy from pinned memory on CUDA."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def upload_ints(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host int64 tensors on `device` through one transfer, as views of one buffer."""
    sizes = [int(p.numel()) for p in parts]
    flat = upload(torch.cat([p.reshape(-1).long() for p in parts]), device)
    out = []
    offset = 0
    for p, n in zip(parts, sizes, strict=True):
        out.append(flat[offset : offset + n].view(p.shape))
        offset += n
    return out
