"""The Mistral 7B transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU.

State dict keys are Mistral's consolidated checkpoint keys, so a state dict loads as is; the
parameters themselves hold q/k/v and w1/w3 fused (one matrix multiply each, on every device,
as gpt-fast does), converted by the state dict hooks. The CPU kernel of each matrix multiply
is chosen in model/cpu_gemm.py.
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
from model.cpu_gemm import CpuGemmChoice, Linear


def fuse_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Replace each layer's q/k/v weights by one `wqkv` and its w1/w3 by one `w13`, in place
    (a layer already fused is left as is). Popped one layer at a time, so a loaded checkpoint
    is never held twice."""
    for fused, parts in _FUSED.items():
        blocks = [k.removesuffix(parts[0]) for k in state if k.startswith(prefix)
                  and k.endswith(parts[0])]  # fmt: skip
        for block in blocks:
            names = [block + part for part in parts]
            if all(name in state for name in names):
                state[block + fused] = torch.cat([state.pop(name) for name in names])


def split_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, prefix: str = "") -> None:
    """The inverse of fuse_state_dict, in place: the consolidated keys, each a view of its rows
    of the fused weight (a checkpoint's layout; packed layers, whose weights are dropped, are
    absent either way)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    sizes = {"attention.wqkv.weight": (q, kv, kv),
             "feed_forward.w13.weight": (args.hidden_dim, args.hidden_dim)}  # fmt: skip
    for fused, parts in _FUSED.items():
        for key in [k for k in state if k.startswith(prefix) and k.endswith(fused)]:
            block = key.removesuffix(fused)
            rows = state.pop(key).split(sizes[fused])
            for part, weight in zip(parts, rows, strict=True):
                state[block + part] = weight


# Fused weight -> the consolidated weights it stacks, by row, in this order.
_FUSED = {
    "attention.wqkv.weight": (
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
    ),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


def _fuse_on_load(module: nn.Module, state: dict[str, torch.Tensor], prefix: str,
                  *_: object) -> None:  # fmt: skip
    fuse_state_dict(state, prefix)


def _split_on_save(module: nn.Module, state: dict[str, torch.Tensor], prefix: str,
                   *_: object) -> None:  # fmt: skip
    assert isinstance(module, Transformer)
    split_state_dict(state, module.args, prefix)


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
        # q, k and v stacked by rows: one GEMM (one launch on a GPU) instead of three; a
        # checkpoint's wq/wk/wv are fused on loading (Transformer's state dict hooks).
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim)
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
        H, KV = self.n_heads, self.n_kv_heads
        # One projection for q, k and v, then one RoPE call over the q and k heads.
        qkv = self.wqkv.forward(x).view(T, H + 2 * KV, self.head_dim)
        qk = apply_rope(qkv[:, : H + KV], freqs)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
        out = backend.attend(q, k, v, meta, cache, layer)
        return self.wo.forward(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # w1 (gate) and w3 (up) stacked by rows: one GEMM for both (see Attention.wqkv).
        self.w13 = Linear(args.dim, 2 * args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13.forward(x).chunk(2, dim=-1)
        return self.w2.forward(F.silu(gate) * up)


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
    cpu_gemm: CpuGemmChoice | None = None  # set by pack_for_cpu

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        # State dicts keep the checkpoint's (consolidated) keys: q/k/v and w1/w3 are fused on
        # loading and split (as views) on saving, so checkpoints and tests see Mistral's names.
        self.register_load_state_dict_pre_hook(_fuse_on_load)
        self.register_state_dict_post_hook(_split_on_save)

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
