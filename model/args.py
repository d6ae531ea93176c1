"""Model arguments, read from a checkpoint's `params.json` or Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from model.errors import CheckpointError

# Mistral 7B v0.1 used 10000; some loaders wrongly default to 1e6 when the field is absent.
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelArgs:
    """Field names follow Mistral's params.json."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = DEFAULT_ROPE_THETA
    # None means full attention: the window is then the context length.
    sliding_window: int | None = None
    max_seq_len: int = 32768

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def window(self) -> int:
        """Keys a query sees, itself included; the rolling cache holds this many positions."""
        return self.sliding_window if self.sliding_window else self.max_seq_len

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Build from a params.json dict (Mistral consolidated layout)."""
        required = ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size")
        missing = [k for k in required if k not in params]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        n_heads = int(params["n_heads"])
        dim = int(params["dim"])
        window = params.get("sliding_window")
        return cls(
            dim=dim,
            n_layers=int(params["n_layers"]),
            head_dim=int(params.get("head_dim") or dim // n_heads),
            hidden_dim=int(params["hidden_dim"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            norm_eps=float(params["norm_eps"]),
            vocab_size=int(params["vocab_size"]),
            rope_theta=float(params.get("rope_theta") or DEFAULT_ROPE_THETA),
            sliding_window=int(window) if window else None,
            max_seq_len=int(
                params.get("max_seq_len") or params.get("max_position_embeddings") or 32768
            ),
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from a Hugging Face MistralConfig dict."""
        required = (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in required if k not in config]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        n_heads = int(config["num_attention_heads"])
        dim = int(config["hidden_size"])
        window = config.get("sliding_window")
        return cls(
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            head_dim=int(config.get("head_dim") or dim // n_heads),
            hidden_dim=int(config["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            vocab_size=int(config["vocab_size"]),
            # transformers >= 5 writes only rope_parameters.rope_theta.
            rope_theta=float(
                config.get("rope_theta")
                or (config.get("rope_parameters") or {}).get("rope_theta")
                or DEFAULT_ROPE_THETA
            ),
            sliding_window=int(window) if window else None,
            max_seq_len=int(config.get("max_position_embeddings") or 32768),
        )


# Mistral 7B v0.1 (params.json of the release): the shape the cache-memory test and the GPU
# benchmark use.
MISTRAL_7B = ModelArgs(
    dim=4096,
    n_layers=32,
    head_dim=128,
    hidden_dim=14336,
    n_heads=32,
    n_kv_heads=8,
    norm_eps=1e-5,
    vocab_size=32000,
    rope_theta=10000.0,
    sliding_window=4096,
    max_seq_len=32768,
)
