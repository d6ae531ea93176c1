"""The CPU kernel choice for the model's matrix multiplies: oneDNN pre-packed or plain.

Every projection of the transformer is a `Linear` of this module. On CPU, `pack_for_cpu`
measures at start-up, per matrix shape, whether oneDNN's pre-packed GEMM beats the default one
on this host, and gives each matrix the faster form: packed (the plain weight dropped), or
plain in a column-major layout. On a GPU nothing here runs: a Linear is `F.linear`. What was
chosen, and how long measuring took, is a `CpuGemmChoice` (start-up log, GetModelInfo).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_log = logging.getLogger(__name__)


class Linear(nn.Linear):
    """nn.Linear (no bias) that can use a oneDNN pre-packed weight on CPU; see `pack_for_cpu`."""

    packed: torch.Tensor | None = None
    mkldnn: bool = False  # `packed` is oneDNN-packed (else a plain column-major matrix)
    # Calls of fewer rows use the plain weight instead of `packed` (the output projection,
    # whose plain weight scoring keeps anyway; see pack_for_cpu).
    packed_from_rows: int = 0

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] >= self.packed_from_rows:
            return packed_linear(x, self.packed, self.mkldnn)
        return F.linear(x, self.weight)


class PackedLinear(Linear):
    """A Linear whose plain weight pack_for_cpu dropped: `weight` is rebuilt on demand from the
    packed matrix (tests, debugging; the forward pass never reads it). A class of its own so
    that unpacked (GPU) layers pay nothing for the lookup."""

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "weight":
            packed = self.__dict__["packed"]
            return packed.to_dense() if packed.is_mkldnn else packed
        return super().__getattr__(name)


def packed_linear(x: torch.Tensor, matrix: torch.Tensor, mkldnn: bool) -> torch.Tensor:
    """x @ matrix.T for a matrix of pack_for_cpu: oneDNN-packed (`mkldnn`, the matrix's
    is_mkldnn: a plain bool so that a traced step does not ask a fake tensor, which answers
    False), or plain where packing was measured slower on this host."""
    if mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, matrix, None, "none", [], "")
    return F.linear(x, matrix)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] with its storage transposed ([in, out] contiguous): same values, same
    shape. F.linear(x, w) is x @ w.T, and with this layout w.T is a contiguous matrix, which
    the default CPU GEMM runs 1.3-2x faster for a decode step's few rows than the [out, in]
    layout nn.Linear keeps (measured on the Intel Xeon of docs/benchmarks.md, one thread, one
    row: 35 vs 55 us for the 7B structure's fused q/k/v, 5 vs 11 us for its w2)."""
    return weight.t().contiguous().t()


def reorder(weight: torch.Tensor) -> torch.Tensor:
    """weight oneDNN-packed for `packed_linear`."""
    # Batch-size hint 8: measured best across 1..256 rows on the AMD EPYC that chose packing.
    return torch.ops.mkldnn._reorder_linear_weight(weight, 8)


def time_ratio(a: Callable[[], object], b: Callable[[], object], budget: float = 0.25) -> float:
    """Shortest time of a over shortest time of b, the two timed in alternation (at least 7
    calls each, after a warm-up; up to ~budget seconds for more). Alternating and the
    shortest: on a shared machine noise only ever adds time, and timing one after the other
    let a burst of another process's work land on one side only (it once chose packing for
    most matrices here, which made a decode step 50% slower)."""
    a()
    b()
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    while len(ta) < 7 or (len(ta) < 200 and time.perf_counter() - start < budget):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta) / min(tb)


PACKING_MARGIN = 0.8
"""Packing is kept when its time ratio (packed / plain, product over 1 and 64 rows) is below
this. The AMD EPYC that first chose packing ran decode rows 2-5x faster packed; the Intel
Xeon of docs/benchmarks.md gives products of 1.5-3 for the 7B structure's matrices."""

# Measured once per process (a test suite builds many engines): (shape, dtype, threads) ->
# the packed/plain time ratio.
_MEASURED: dict[tuple[tuple[int, ...], torch.dtype, int], float] = {}


def packing_ratio(weight: torch.Tensor) -> float:
    """Time of oneDNN's packed GEMM over the default one's for this matrix on this host.

    Which is faster depends on the CPU: on the AMD EPYC this engine was first measured on, the
    packed call ran a decode step's few rows 2-5x faster; on an Intel Xeon (480 MiB L3) the
    packed call of the 7B structure's small matrices took 30-130 us at one row against 10-50 us
    for F.linear. So it is measured, at one row (decode) and 64 (pre-fill chunks and label
    trees): the product of the two time ratios.
    """
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    threads = torch.get_num_threads()
    # On one thread: with more, a parallel GEMM waits for a core another process holds, and
    # which kernel won then depended on the neighbours' load, not on the kernels.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            packed = reorder(weight)
            plain = column_major(weight)  # the layout a matrix that is not packed gets
            ratio = 1.0
            for rows in (1, 64):
                x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
                ratio *= time_ratio(
                    functools.partial(packed_linear, x, packed, True),
                    functools.partial(F.linear, x, plain),
                )
    finally:
        torch.set_num_threads(threads)
    _MEASURED[key] = ratio
    return ratio


def packing_pays(weight: torch.Tensor) -> bool:
    """Whether packing this matrix pays on this host: a clear margin (PACKING_MARGIN), since
    where the two are close (this Intel Xeon at 64 rows) noise would pick either, and the
    plain matrix is the one every backend (and inductor) can run."""
    return packing_ratio(weight) < PACKING_MARGIN


@dataclass(frozen=True)
class MatrixChoice:
    """The kernel of one matrix shape: which layers have it, packed or not, and why."""

    names: tuple[str, ...]  # the layers' names in a block ("wqkv", ...) or "output"
    shape: tuple[int, int]  # [out, in]
    packed: bool
    ratio: float | None  # measured packed/plain time (product over 1 and 64 rows); None: forced


@dataclass(frozen=True)
class CpuGemmChoice:
    """What pack_for_cpu chose for each matrix shape, and how long measuring took."""

    matrices: tuple[MatrixChoice, ...]
    measure_seconds: float

    @property
    def packed(self) -> int:
        """Matrix shapes that run oneDNN-packed."""
        return sum(m.packed for m in self.matrices)

    def describe(self) -> str:
        """One line: the choice per matrix shape ("wqkv 48x32 packed (0.61)")."""
        parts = []
        for m in self.matrices:
            kind = "oneDNN packed" if m.packed else "plain"
            ratio = "forced" if m.ratio is None else f"packed/plain time {m.ratio:.2f}"
            parts.append(f"{'/'.join(m.names)} {m.shape[0]}x{m.shape[1]} {kind} ({ratio})")
        return (
            f"cpu gemm: {self.packed} of {len(self.matrices)} matrix shapes oneDNN-packed "
            f"(kept below {PACKING_MARGIN}), measured in {self.measure_seconds:.2f} s: "
            + "; ".join(parts)
        )


def _pack(layer: Linear, packed: bool) -> None:
    """Give one layer its chosen form: packed (its plain weight dropped) or column-major."""
    # Without no_grad the new matrix would carry an autograd graph that keeps the dropped
    # parameter alive.
    with torch.no_grad():
        weight = layer.weight.detach()
        if not packed:
            layer.weight = nn.Parameter(column_major(weight), requires_grad=False)
            return
        matrix = reorder(weight.contiguous())
    del layer.weight
    layer.__class__ = PackedLinear
    layer.packed = matrix
    layer.mkldnn = True


def pack_for_cpu(model: nn.Module, *, packed: bool | None = None) -> CpuGemmChoice | None:
    """Give every Linear of a CPU model its faster GEMM form (same values, same results), and
    return what was chosen; None (nothing changed) off CPU or where oneDNN or a supported
    dtype is absent.

    `packed=None` measures per matrix shape (`packing_pays`); True/False forces it. Packed
    layers drop their plain weights (a 7B would otherwise need twice its 14.5 GB of bf16),
    except the output projection's, which scoring reads row by row (token_logits): 1.8% of the
    7B. A packed model is for CPU inference: its state_dict lacks the dropped weights and .to()
    does not move the packed ones. Packing twice returns the first choice.
    """
    done: CpuGemmChoice | None = getattr(model, "cpu_gemm", None)
    if done is not None:
        return done
    output = getattr(model, "output", None)
    if not isinstance(output, Linear):
        raise TypeError("pack_for_cpu takes a model whose output projection is a Linear")
    weight = output.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    start = time.perf_counter()
    by_shape: dict[tuple[int, int], list[tuple[str, Linear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module is not output:
            by_shape.setdefault((module.out_features, module.in_features), []).append(
                (name, module)
            )
    choices: list[MatrixChoice] = []
    for shape, layers in by_shape.items():
        ratio = None if packed is not None else packing_ratio(layers[0][1].weight.detach())
        pack = packed if packed is not None else ratio is not None and ratio < PACKING_MARGIN
        for _, layer in layers:
            _pack(layer, pack)
        names = tuple(sorted({name.rsplit(".", 1)[-1] for name, _ in layers}))
        choices.append(MatrixChoice(names, shape, pack, ratio))
    ratio = None if packed is not None else packing_ratio(weight.detach())
    pack = packed if packed is not None else ratio is not None and ratio < PACKING_MARGIN
    with torch.no_grad():
        if pack:
            output.packed = reorder(weight.detach().contiguous())
            output.mkldnn = True
        else:  # scoring reads its rows: kept as a parameter, in the faster layout
            output.weight = nn.Parameter(column_major(weight.detach()), requires_grad=False)
            if packed is None:
                # Both forms of the largest matrix (1.8% of a 7B; the plain one is kept for
                # scoring anyway): packed for 8 rows and more, where the engine ran it faster
                # with the weights streaming from memory although timed hot it loses (60M
                # model, 8 sequences: 373 against 456 ms; one sequence, plain, unchanged).
                output.packed = reorder(weight.detach().contiguous())
                output.mkldnn = True
                output.packed_from_rows = 8
    choices.append(MatrixChoice(("output",), (output.out_features, output.in_features), pack,
                                ratio))  # fmt: skip
    choice = CpuGemmChoice(tuple(choices), time.perf_counter() - start)
    setattr(model, "cpu_gemm", choice)  # noqa: B010 (an nn.Module: typed Tensor | Module)
    _log.info(choice.describe())  # the start-up log: which kernel this host runs, and why
    return choice
