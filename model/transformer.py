"""The Mistral 7B transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameter names are Mistral's consolidated checkpoint keys, so a state dict loads as is.
Tokens of all sequences in a forward pass are packed into one flat tensor (no padding); the
per-pass indexing (positions, cache slots, masks) lives in `ForwardMetadata`, computed once by
the cache and only read here.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.attention import AttentionBackend, select_backend
from model.cache import ForwardMetadata, RollingCache


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
    packed matrix holding it (tests, debugging; the forward pass never reads it). A class of
    its own so that unpacked (GPU) layers pay nothing for the lookup."""

    packed_rows: tuple[torch.Tensor, int, int]  # (packed matrix, first row, end row)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "weight":
            packed, start, end = self.packed_rows
            return packed.to_dense()[start:end]
        return super().__getattr__(name)


def packed_linear(x: torch.Tensor, matrix: torch.Tensor, mkldnn: bool) -> torch.Tensor:
    """x @ matrix.T for a fused matrix of pack_for_cpu: oneDNN-packed (`mkldnn`, the matrix's
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


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    # Batch-size hint 8: measured best across 1..256 rows on the AMD EPYC that chose packing.
    return torch.ops.mkldnn._reorder_linear_weight(weight, 8)


def _ratio(a: Callable[[], object], b: Callable[[], object], budget: float = 0.25) -> float:
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

_PACKING_PAYS: dict[tuple[tuple[int, ...], torch.dtype, int], bool] = {}


def packing_pays(weight: torch.Tensor) -> bool:
    """Whether oneDNN's packed GEMM beats the default one for this matrix on this host.

    Which is faster depends on the CPU: on the AMD EPYC this engine was first measured on, the
    packed call ran a decode step's few rows 2-5x faster; on an Intel Xeon (480 MiB L3) the
    packed call of the 7B structure's small matrices took 30-130 us at one row against 10-50 us
    for F.linear. So it is measured here, at one row (decode) and 64 (pre-fill chunks and
    label trees), and packing is kept when the product of the two time ratios favours it
    clearly (PACKING_MARGIN).
    """
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key in _PACKING_PAYS:  # measured once per process (a test suite builds many engines)
        return _PACKING_PAYS[key]
    threads = torch.get_num_threads()
    # On one thread: with more, a parallel GEMM waits for a core another process holds, and
    # which kernel won then depended on the neighbours' load, not on the kernels.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            packed = _reorder(weight)
            plain = column_major(weight)  # the layout a matrix that is not packed gets
            ratio = 1.0
            for rows in (1, 64):
                x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
                ratio *= _ratio(
                    functools.partial(packed_linear, x, packed, True),
                    functools.partial(F.linear, x, plain),
                )
    finally:
        torch.set_num_threads(threads)
    # A clear margin: where the two are close (this Intel Xeon at 64 rows), noise would pick
    # either, and the plain matrix is the one every backend (and inductor) can run.
    _PACKING_PAYS[key] = ratio < PACKING_MARGIN
    return ratio < PACKING_MARGIN


def _fuse(*layers: Linear, packed: bool) -> torch.Tensor:
    """One matrix of the layers' weights stacked (oneDNN-packed, or plain), which then drop
    their own: a plain fused matrix lends each layer a view of its rows as its weight."""
    # Without no_grad the fused matrix would carry an autograd graph that keeps the dropped
    # parameters alive.
    with torch.no_grad():
        plain = torch.cat([layer.weight for layer in layers])
        matrix = _reorder(plain) if packed else column_major(plain)
    start = 0
    for layer in layers:
        end = start + layer.out_features
        del layer.weight
        if packed:
            layer.__class__ = PackedLinear
            assert isinstance(layer, PackedLinear)
            layer.packed_rows = (matrix, start, end)
        else:
            layer.weight = nn.Parameter(matrix[start:end], requires_grad=False)
        start = end
    return matrix


def pack_for_cpu(model: Transformer, *, packed: bool | None = None) -> bool:
    """Fuse and, where it pays on this host, oneDNN-pack the linear weights for CPU inference;
    same values, same results.

    q/k/v and w1/w3 become one matrix each: every GEMM call has a fixed cost (~40 us for a
    oneDNN call here), seven per layer per step add up. Packing (`packed=None`: measured per
    matrix shape by `packing_pays`; True/False forces it) changes the GEMM kernel only. Packed
    layers drop their plain weights (a 7B would otherwise need twice its 14.5 GB of bf16),
    except the output projection's, which scoring reads row by row (token_logits): 1.8% of the
    7B. A packed model is for CPU inference: its state_dict lacks the dropped weights and .to()
    does not move the packed ones. Packing twice is a no-op. Returns False (and changes
    nothing) where oneDNN or a supported dtype is absent.
    """
    weight = model.output.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if model.cpu_fused:
        return True
    model.cpu_fused = True
    decided: dict[tuple[int, int], bool] = {}

    def pays(*layers: Linear) -> bool:
        shape = (sum(layer.out_features for layer in layers), layers[0].in_features)
        if shape not in decided:
            if packed is not None:
                decided[shape] = packed
            elif len(layers) == 1:  # no copy of a lone matrix (the output projection: 1.8% of a 7B)
                decided[shape] = packing_pays(layers[0].weight.detach())
            else:
                with torch.no_grad():
                    fused = torch.cat([layer.weight for layer in layers]).contiguous()
                decided[shape] = packing_pays(fused)
        return decided[shape]

    for layer in model.layers:
        assert isinstance(layer, TransformerBlock)
        attn, ffn = layer.attention, layer.feed_forward
        attn.qkv_packed = _fuse(attn.wq, attn.wk, attn.wv, packed=pays(attn.wq, attn.wk, attn.wv))
        attn.wo.packed = _fuse(attn.wo, packed=pays(attn.wo))
        ffn.w13_packed = _fuse(ffn.w1, ffn.w3, packed=pays(ffn.w1, ffn.w3))
        ffn.w2.packed = _fuse(ffn.w2, packed=pays(ffn.w2))
        attn.qkv_mkldnn = attn.qkv_packed.is_mkldnn
        attn.wo.mkldnn = attn.wo.packed.is_mkldnn
        ffn.w13_mkldnn = ffn.w13_packed.is_mkldnn
        ffn.w2.mkldnn = ffn.w2.packed.is_mkldnn
    if pays(model.output):
        with torch.no_grad():
            model.output.packed = _reorder(weight.contiguous())
            model.output.mkldnn = True
    else:  # scoring reads its rows: kept as a parameter, in the faster layout
        model.output.weight = nn.Parameter(column_major(weight.detach()), requires_grad=False)
        if packed is None:
            # Both forms of the largest matrix (1.8% of a 7B; the plain one is kept for
            # scoring anyway): packed for 8 rows and more, where the engine ran it faster
            # with the weights streaming from memory although timed hot it loses (60M model,
            # 8 sequences: 373 against 456 ms; one sequence, plain, unchanged).
            with torch.no_grad():
                model.output.packed = _reorder(weight.detach().contiguous())
            model.output.mkldnn = True
            model.output.packed_from_rows = 8
    return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel rather than four elementwise passes; in fp32 with the weight inside
        # it (one op: a decode step is mostly per-op overhead). Half precision normalises in
        # fp32 like the reference (a bf16 variance loses too much precision), then rounds
        # before the weight, as the reference does.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotations as real (cos, sin) pairs for each position, shape [T, head_dim // 2, 2].

    Real-valued rather than complex so that a compiled or captured step can fuse it (inductor
    does not lower complex arithmetic)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rope_rotations(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """The rotations of rope_frequencies as complex numbers, [T, 1, head_dim // 2]: what
    apply_rope takes in eager passes, where the rotation is then one complex product (one op
    instead of six, per layer; a decode step is mostly per-op overhead)."""
    freqs = rope_frequencies(positions, head_dim, theta)
    return torch.view_as_complex(freqs)[:, None]


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [T, H, D] by freqs: (x0 cos - x1 sin,
    x0 sin + x1 cos), the product of complex numbers. `freqs` complex [T, 1, D/2]
    (rope_rotations: one complex product) or real [T, D/2, 2] (rope_frequencies: the product
    written out, which inductor can lower and fuse)."""
    if freqs.is_complex():
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        out = torch.view_as_real(xc * freqs).flatten(-2)
        return out if x.dtype == torch.float32 else out.type_as(x)  # type_as is an op even so
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs[:, None, :, :1], freqs[:, None, :, 1:]
    rotated = torch.stack([-xf[..., 1], xf[..., 0]], dim=-1)  # (x0, x1) -> (-x1, x0)
    return (xf * cos + rotated * sin).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.qkv_packed: torch.Tensor | None = None  # set by pack_for_cpu
        self.qkv_mkldnn = False

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        meta: ForwardMetadata,
        backend: AttentionBackend,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        T = x.shape[0]
        H, KV = self.n_heads, self.n_kv_heads
        if self.qkv_packed is not None:
            # One projection for q, k and v, then one RoPE call over the q and k heads.
            qkv = packed_linear(x, self.qkv_packed, self.qkv_mkldnn).view(
                T, H + 2 * KV, self.head_dim
            )
            qk = apply_rope(qkv[:, : H + KV], freqs)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
        else:
            q = apply_rope(self.wq(x).view(T, H, self.head_dim), freqs)
            k = apply_rope(self.wk(x).view(T, KV, self.head_dim), freqs)
            v = self.wv(x).view(T, KV, self.head_dim)
        out = backend.attend(q, k, v, meta, cache, layer)
        return self.wo.forward(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.w3 = Linear(args.dim, args.hidden_dim)
        self.w13_packed: torch.Tensor | None = None  # set by pack_for_cpu
        self.w13_mkldnn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13_packed is not None:
            gate, up = packed_linear(x, self.w13_packed, self.w13_mkldnn).chunk(2, dim=-1)
            return self.w2.forward(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        meta: ForwardMetadata,
        backend: AttentionBackend,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        # .forward: see Transformer.run.
        a = self.attention.forward(self.attention_norm.forward(x), freqs, meta, backend, cache,
                                   layer)  # fmt: skip
        h = x + a
        return h + self.feed_forward.forward(self.ffn_norm.forward(h))


class Transformer(nn.Module):
    cpu_fused: bool = False  # pack_for_cpu has run

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        meta: ForwardMetadata,
        cache: RollingCache | None = None,
        *,
        logits_index: torch.Tensor | None = None,
        backend: AttentionBackend | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (fp32) for packed `tokens`; only at `logits_index` rows, in that order, when
        given.
        hidden=True returns those rows' final normalised hidden states instead (see `project`).

        With a cache, each sequence attends to its cached window plus its new tokens and the
        new keys/values are written to the rolling buffer. Without one, `meta` must describe
        fresh sequences (nothing cached) and the pass is a plain sliding-window forward.
        """
        backend = backend or select_backend("auto", self.device, self.dtype)
        backend.prepare(meta, self.dtype)  # a no-op when the engine prepared the pass
        return self.run(tokens, meta, cache, logits_index, backend, hidden)

    def run(
        self,
        tokens: torch.Tensor,
        meta: ForwardMetadata,
        cache: RollingCache | None,
        logits_index: torch.Tensor | None,
        backend: AttentionBackend,
        hidden: bool,
    ) -> torch.Tensor:
        """forward() of a prepared pass, without inference mode: what a compiled step runs."""
        h = self.tok_embeddings(tokens)
        # Real-valued rotations where a compiler traces the pass (inductor does not lower
        # complex arithmetic), complex ones (one op per layer) in eager passes.
        rope = rope_frequencies if torch.compiler.is_compiling() else rope_rotations
        freqs = rope(meta.positions, self.args.head_dim, self.args.rope_theta)
        # .forward: the layers' own code, without nn.Module.__call__'s hook dispatch, which
        # is paid per module per layer per step (a decode step is mostly such overhead).
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, freqs, meta, backend, cache, i)
        if logits_index is not None:
            # Skip the vocabulary projection for rows nobody reads (most of a pre-fill).
            h = h.index_select(0, logits_index)
        h = self.norm(h)
        return h if hidden else self.project(h)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) of final hidden states: the output projection onto the vocabulary."""
        return self.output(hidden).float()

    def token_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logit (fp32) of tokens[i] for hidden[i], without projecting onto the whole vocabulary."""
        rows = self.output.weight.index_select(0, tokens)
        return (hidden.float() * rows.float()).sum(-1)
