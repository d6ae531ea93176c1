"""The Mistral 7B transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameter names are Mistral's consolidated checkpoint keys, so a state dict loads as is.
Tokens of all sequences in a forward pass are packed into one flat tensor (no padding); the
per-pass indexing (positions, cache slots, masks) lives in `ForwardMetadata`, computed once by
the cache and only read here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.attention import AttentionBackend, select_backend
from model.cache import ForwardMetadata, RollingCache


class Linear(nn.Linear):
    """nn.Linear (no bias) that can use a oneDNN pre-packed weight on CPU; see `pack_for_cpu`."""

    packed: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


def pack_for_cpu(model: nn.Module) -> bool:
    """Re-lay linear weights for fast CPU inference; same values, so the same results.

    Measured on this project's CPU (bench/engine_bench.py): MKL's GEMV is ~2.5x faster with
    the weight stored input-major (one token, decode), and oneDNN's pre-packed GEMM ~2x faster
    for a few rows (batched decode) and ~1.3x for pre-fill. Returns False where oneDNN is absent.
    """
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears or linears[0].weight.device.type != "cpu":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    for lin in linears:
        w = lin.weight.data.contiguous()
        if w.dtype not in (torch.float32, torch.bfloat16):
            return False
        # Batch-size hint 8: measured best across 1..256 rows.
        lin.packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        lin.weight.data = w.t().contiguous().t()
    return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference; bf16 variance loses too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Complex rotations e^(i*pos*freq) for each position, shape [T, head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [T, H, D] by freqs [T, D/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs[:, None, :]).flatten(-2)
    return out.type_as(x)


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
        q = apply_rope(self.wq(x).view(T, self.n_heads, self.head_dim), freqs)
        k = apply_rope(self.wk(x).view(T, self.n_kv_heads, self.head_dim), freqs)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
        out = backend.attend(q, k, v, meta, cache, layer)
        return self.wo(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.w3 = Linear(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        h = x + self.attention(self.attention_norm(x), freqs, meta, backend, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
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
    ) -> torch.Tensor:
        """Logits (fp32) for packed `tokens`; only at `logits_index` rows when given.

        With a cache, each sequence attends to its cached window plus its new tokens and the
        new keys/values are written to the rolling buffer. Without one, `meta` must describe
        fresh sequences (nothing cached) and the pass is a plain sliding-window forward.
        """
        backend = backend or select_backend("auto", self.device, self.dtype)
        h = self.tok_embeddings(tokens)
        freqs = rope_frequencies(meta.positions, self.args.head_dim, self.args.rope_theta)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, meta, backend, cache, i)
        if logits_index is not None:
            # Skip the vocabulary projection for rows nobody reads (most of a pre-fill).
            h = h.index_select(0, logits_index)
        return self.output(self.norm(h)).float()
