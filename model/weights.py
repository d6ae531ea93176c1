"""Checkpoint loading and saving: Mistral's consolidated layout and Hugging Face's.

Tensors are read memory-mapped from safetensors straight to the target device, checked against
the shapes ModelArgs implies, and returned under Mistral's consolidated key names (the
Transformer's parameter names). Hugging Face permutes the rows of q/k projections for its
rotate-half RoPE; loading undoes that so one interleaved RoPE serves both layouts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.args import ModelArgs
from model.errors import CheckpointError

if TYPE_CHECKING:
    from model.transformer import Transformer

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# safetensors dtype names we load; anything else (ints, bools, fp8) is not a float checkpoint.
_FLOAT_FILE_DTYPES = {"F16", "BF16", "F32", "F64"}

# Hugging Face name -> consolidated name, per layer (N) and global.
_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Old transformers versions saved RoPE tables as buffers; they carry no weights.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype for a dtype or its name ("bf16", "float32", ...); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating point torch dtype, got {dtype!r}")
    return dtype


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every consolidated key of a checkpoint for `args`, with its shape."""
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "attention.wq.weight"] = (q_dim, args.dim)
        shapes[p + "attention.wk.weight"] = (kv_dim, args.dim)
        shapes[p + "attention.wv.weight"] = (kv_dim, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, q_dim)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
        shapes[p + "feed_forward.w1.weight"] = (args.hidden_dim, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, args.hidden_dim)
        shapes[p + "feed_forward.w3.weight"] = (args.hidden_dim, args.dim)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def hf_to_consolidated_name(key: str) -> str | None:
    """Consolidated name of a Hugging Face key, or None when it is not a Mistral weight."""
    if key in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[key]
    match = _HF_LAYER_KEY.fullmatch(key)
    if match and match.group(2) in _HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{_HF_LAYER_NAMES[match.group(2)]}"
    return None


def consolidated_to_hf_name(name: str) -> str:
    """Hugging Face key of a consolidated name."""
    for hf, ours in _HF_GLOBAL_NAMES.items():
        if name == ours:
            return hf
    layer, _, rest = name.removeprefix("layers.").partition(".")
    for hf, ours in _HF_LAYER_NAMES.items():
        if rest == ours:
            return f"model.layers.{layer}.{hf}"
    raise KeyError(name)


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from interleaved-pair RoPE to rotate-half RoPE, per head.

    transformers' convert_mistral_weights_to_hf.py `permute`: within each head, rows
    (0, 1, 2, 3, ...) become (0, 2, 4, ..., 1, 3, 5, ...).
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_for_hf`: rotate-half rows back to interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _hf_files(folder: Path) -> list[Path]:
    """Safetensors files of a Hugging Face folder: from the shard index, else model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("model*.safetensors"))
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    files = []
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if not shard.is_file():
            key = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(f"{shard}: not found (listed in {index.name} for {key})")
        files.append(shard)
    return files


def _find_checkpoint(folder: Path) -> tuple[ModelArgs, list[Path], bool]:
    """ModelArgs, safetensors files and whether the layout is Hugging Face's."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    params, config = folder / "params.json", folder / "config.json"
    # Hub repos often hold both layouts; prefer consolidated, like mistral-inference.
    consolidated = sorted(folder.glob("consolidated*.safetensors"))
    if params.is_file() and consolidated:
        return ModelArgs.from_params(_read_json(params), str(params)), consolidated, False
    if config.is_file():
        files = _hf_files(folder)
        if files:
            return ModelArgs.from_hf_config(_read_json(config), str(config)), files, True
        raise CheckpointError(f"{folder}: config.json but no model*.safetensors files")
    if params.is_file():
        pth = " (only .pth files, which are not supported)" if any(folder.glob("*.pth")) else ""
        raise CheckpointError(f"{folder}: params.json but no consolidated*.safetensors{pth}")
    raise CheckpointError(f"{folder}: no params.json or config.json")


@contextmanager
def _open(file: Path, device: str) -> Iterator[Any]:
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            yield f
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and the state dict (consolidated names) of a checkpoint folder, either layout."""
    folder = Path(path)
    target = resolve_dtype(dtype)
    try:
        device = str(torch.device(device))
    except RuntimeError as exc:
        raise CheckpointError(f"invalid device {device!r}") from exc
    args, files, hf = _find_checkpoint(folder)
    shapes = expected_shapes(args)
    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for file in files:
        with _open(file, device) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                if hf and _HF_IGNORED.fullmatch(key):
                    continue
                name = hf_to_consolidated_name(key) if hf else key
                if name is None or name not in shapes:
                    raise CheckpointError(f"{file}: unexpected key {key}")
                if name in state:
                    raise CheckpointError(f"{file}: key {key} also in {where[name]}")
                state[name] = _read_tensor(f, file, key, shapes[name], target, args if hf else None)
                where[name] = file
    missing = [k for k in shapes if k not in state]
    if missing:
        keys = [consolidated_to_hf_name(k) for k in missing] if hf else missing
        names = ", ".join(f.name for f in files)
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise CheckpointError(f"{folder} ({names}): missing key(s) {', '.join(keys[:5])}{more}")
    return args, state


def _read_tensor(
    f: Any,
    file: Path,
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype | None,
    hf_args: ModelArgs | None,
) -> torch.Tensor:
    """One tensor, shape and dtype checked from the header before any data is read."""
    header = f.get_slice(key)
    file_shape, file_dtype = tuple(header.get_shape()), header.get_dtype()
    if file_shape != shape:
        raise CheckpointError(
            f"{file}: key {key} has shape {list(file_shape)}, expected {list(shape)}"
        )
    if file_dtype not in _FLOAT_FILE_DTYPES:
        raise CheckpointError(f"{file}: key {key} has dtype {file_dtype}, expected a float dtype")
    try:
        tensor: torch.Tensor = f.get_tensor(key)
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: key {key} could not be read ({exc})") from exc
    if hf_args is not None and key.endswith(("q_proj.weight", "k_proj.weight")):
        heads = hf_args.n_heads if key.endswith("q_proj.weight") else hf_args.n_kv_heads
        tensor = unpermute_from_hf(tensor, heads)
    return tensor if dtype is None else tensor.to(dtype)


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """A Transformer in eval mode, no grads, with the weights of a checkpoint folder."""
    # here: the engine is not needed to read weights
    from model.transformer import Transformer, fuse_state_dict

    args, state = load_checkpoint(path, device=device, dtype=dtype)
    # q/k/v and w1/w3 fused here, layer by layer, rather than by the model's load hook, which
    # sees a copy of this dict: each layer's parts are freed as soon as they are stacked.
    fuse_state_dict(state)
    # Built on meta then assigned the loaded tensors: no random init, no second copy in memory.
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous or storage-sharing tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors writes 0600 files; a checkpoint baked into an image as root must stay
    # readable by the non-root user the service runs as.
    path.chmod(0o644)


def _check_state(args: ModelArgs, state: Mapping[str, torch.Tensor]) -> None:
    shapes = expected_shapes(args)
    if set(state) != set(shapes):
        extra, missing = sorted(set(state) - set(shapes)), sorted(set(shapes) - set(state))
        raise CheckpointError(f"state dict does not match args: missing {missing}, extra {extra}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            got = list(state[name].shape)
            raise CheckpointError(f"{name}: shape {got}, expected {list(shape)}")


def save_consolidated(
    folder: str | Path,
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    *,
    extra_params: Mapping[str, Any] | None = None,
) -> Path:
    """Write params.json (plus `extra_params`) and consolidated.safetensors; returns the folder."""
    _check_state(args, state_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = {**args.to_params(), **(extra_params or {})}
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    _save(_contiguous(state_dict), folder / "consolidated.safetensors")
    return folder


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A MistralConfig-style config.json dict for `args`."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions and other tools rope_theta.
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(
    folder: str | Path,
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
) -> Path:
    """Write config.json and model.safetensors (or `shards` files plus an index) in HF layout."""
    _check_state(args, state_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state_dict.values())).dtype
    (folder / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")
    hf_state = {}
    for name, tensor in _contiguous(state_dict).items():
        if name.endswith("attention.wq.weight"):
            tensor = permute_for_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_for_hf(tensor, args.n_kv_heads)
        hf_state[consolidated_to_hf_name(name)] = tensor.contiguous()
    if shards == 1:
        _save(hf_state, folder / "model.safetensors")
        return folder
    keys = list(hf_state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf_state[k] for k in keys[i::shards]}
        _save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
