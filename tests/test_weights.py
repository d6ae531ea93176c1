"""Checkpoint loading and saving in both layouts, the HF q/k permutation, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.args import ModelArgs
from model.demo import random_weights
from model.errors import CheckpointError
from model.weights import (
    consolidated_to_hf_name,
    expected_shapes,
    hf_config,
    load_checkpoint,
    load_model,
    permute_for_hf,
    save_consolidated,
    save_hf,
    unpermute_from_hf,
)

# Small, GQA, rope_theta not the default (so a loader that drops it is caught), and a head_dim
# that is not dim // n_heads (so a loader that derives it is caught).
ARGS = ModelArgs(
    dim=32,
    n_layers=2,
    head_dim=16,
    hidden_dim=48,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=100,
    rope_theta=1e6,
    sliding_window=16,
    max_seq_len=128,
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_weights(ARGS, seed=3)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def write_raw(folder: Path, tensors: dict[str, torch.Tensor], args: ModelArgs = ARGS) -> Path:
    """A consolidated folder with exactly these tensors, bypassing save_consolidated's checks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(args.to_params()))
    save_file({k: v.clone() for k, v in tensors.items()}, str(folder / "consolidated.safetensors"))
    return folder


# --- layouts ---------------------------------------------------------------------------------


def test_consolidated_round_trip(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_consolidated(tmp_path, ARGS, state)
    args, loaded = load_checkpoint(tmp_path)
    assert args == ARGS
    assert_same_state(loaded, state)


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_round_trip(tmp_path: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    save_hf(tmp_path, ARGS, state, shards=shards)
    if shards > 1:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    args, loaded = load_checkpoint(tmp_path)
    assert args == ARGS
    assert_same_state(loaded, state)


def test_consolidated_in_several_files(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    (tmp_path / "params.json").write_text(json.dumps(ARGS.to_params()))
    keys = list(state)
    for i in range(2):
        part = {k: state[k] for k in keys[i::2]}
        save_file(part, str(tmp_path / f"consolidated-0000{i + 1}-of-00002.safetensors"))
    assert_same_state(load_checkpoint(tmp_path)[1], state)


def test_prefers_consolidated(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    """Hub repos often ship both layouts; the consolidated one wins."""
    save_hf(tmp_path, ARGS, random_weights(ARGS, seed=99))
    save_consolidated(tmp_path, ARGS, state)
    assert_same_state(load_checkpoint(tmp_path)[1], state)


def test_hf_ignores_rotary_buffers(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_hf(tmp_path, ARGS, state)
    extra = tmp_path / "model-extra.safetensors"
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, str(extra))
    assert_same_state(load_checkpoint(tmp_path)[1], state)


def test_saved_files_are_world_readable(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_consolidated(tmp_path / "c", ARGS, state)
    save_hf(tmp_path / "h", ARGS, state)
    for f in [tmp_path / "c" / "consolidated.safetensors", tmp_path / "h" / "model.safetensors"]:
        assert f.stat().st_mode & 0o044 == 0o044


# --- the HF permutation ------------------------------------------------------------------------


def test_unpermute_inverts_permute() -> None:
    w = torch.randn(ARGS.n_heads * ARGS.head_dim, ARGS.dim)
    p = permute_for_hf(w, ARGS.n_heads)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_from_hf(p, ARGS.n_heads), w)
    # Within a head, rotate-half order is (0, 2, 4, ..., 1, 3, 5, ...) of the interleaved rows.
    head = torch.arange(ARGS.head_dim)
    assert p[: ARGS.head_dim, 0].tolist() == w[torch.cat([head[0::2], head[1::2]]), 0].tolist()


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Mistral's consolidated RoPE on x [T, H, D]: rotate pairs (x0, x1), (x2, x3), ..."""
    T, _, D = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(torch.view_as_complex(x.reshape(T, -1, D // 2, 2)) * rot).flatten(-2)


def test_permutation_matches_transformers_rope(state: dict[str, torch.Tensor]) -> None:
    """Attention scores: HF weights + HF rotate-half RoPE == our weights + interleaved RoPE."""
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import (
        MistralRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    T, H, KV, D = 10, ARGS.n_heads, ARGS.n_kv_heads, ARGS.head_dim
    wq = state["layers.0.attention.wq.weight"].double()
    wk = state["layers.0.attention.wk.weight"].double()
    x = torch.randn(T, ARGS.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [T, H, D], [T, KV, D]
        k = k.repeat_interleave(H // KV, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    ours = scores(
        interleaved_rope((x @ wq.T).view(T, H, D), ARGS.rope_theta),
        interleaved_rope((x @ wk.T).view(T, KV, D), ARGS.rope_theta),
    )

    config = MistralConfig(**hf_config(ARGS))
    cos, sin = MistralRotaryEmbedding(config)(x[None], torch.arange(T)[None])

    def hf_scores(wq_hf: torch.Tensor, wk_hf: torch.Tensor) -> torch.Tensor:
        q = (x @ wq_hf.T).view(1, T, H, D).transpose(1, 2)
        k = (x @ wk_hf.T).view(1, T, KV, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        return scores(q[0].transpose(0, 1), k[0].transpose(0, 1))

    permuted = hf_scores(permute_for_hf(wq, H), permute_for_hf(wk, KV))
    # transformers builds cos/sin in float32: 1e-5 relative is its rounding, not ours.
    torch.testing.assert_close(permuted, ours, atol=1e-5, rtol=1e-5)
    # Control: without the permutation the two RoPE layouts disagree by O(1).
    assert (hf_scores(wq, wk) - ours).abs().max() > 0.1


def test_save_hf_loads_in_transformers(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open
    from transformers import MistralForCausalLM

    save_hf(tmp_path, ARGS, state)
    model = MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    config = model.config
    assert (config.head_dim, config.sliding_window, config.num_key_value_heads) == (16, 16, 2)
    assert isinstance(config.rope_parameters, dict)
    assert config.rope_parameters["rope_theta"] == ARGS.rope_theta
    hf_state = model.state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(hf_state)
        for key in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(key), hf_state[key]), key


def test_config_saved_by_transformers_keeps_rope_theta(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    from transformers import MistralConfig

    save_hf(tmp_path, ARGS, state)
    MistralConfig.from_pretrained(tmp_path).save_pretrained(tmp_path)  # as a re-save would
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())
    args, _ = load_checkpoint(tmp_path)
    assert args.rope_theta == ARGS.rope_theta


def test_logits_match_transformers(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    """End to end: our Transformer on the HF folder == transformers on the same folder."""
    from transformers import MistralForCausalLM

    from model.cache import ForwardMetadata

    save_hf(tmp_path, ARGS, state)
    reference = MistralForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    tokens = torch.randint(0, ARGS.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens[None]).logits[0]
    model = load_model(tmp_path)
    meta = ForwardMetadata.fresh([len(tokens)], ARGS.window, torch.device("cpu"))
    torch.testing.assert_close(model(tokens, meta), expected, atol=1e-4, rtol=1e-4)


# --- dtype, device, memory mapping --------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (None, torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("FP16", torch.float16),
        ("float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_conversion(
    tmp_path: Path,
    state: dict[str, torch.Tensor],
    dtype: str | torch.dtype | None,
    expected: torch.dtype,
) -> None:
    save_hf(tmp_path, ARGS, state)
    _, loaded = load_checkpoint(tmp_path, dtype=dtype)
    for k, v in loaded.items():
        assert v.dtype == expected, k
        assert torch.equal(v, state[k].to(expected)), k


def test_file_dtype_kept_by_default(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_consolidated(tmp_path, ARGS, {k: v.bfloat16() for k, v in state.items()})
    _, loaded = load_checkpoint(tmp_path)
    assert {v.dtype for v in loaded.values()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["int8", "fp8", torch.int32])
def test_unknown_dtype(tmp_path: Path, state: dict[str, torch.Tensor], dtype: object) -> None:
    save_consolidated(tmp_path, ARGS, state)
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(tmp_path, dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_loading_is_memory_mapped(tmp_path: Path) -> None:
    """Tensors stay backed by the file: loading 64 MB barely grows resident memory."""
    args = dataclasses.replace(ARGS, dim=256, n_heads=16, n_kv_heads=8, vocab_size=32000)
    save_consolidated(tmp_path, args, {k: torch.zeros(s) for k, s in expected_shapes(args).items()})
    size = (tmp_path / "consolidated.safetensors").stat().st_size
    assert size > 60e6

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    before = rss()
    _, loaded = load_checkpoint(tmp_path)
    grown = rss() - before
    assert grown < size / 4, f"resident memory grew {grown >> 20} MiB for {size >> 20} MiB"
    assert loaded["tok_embeddings.weight"].shape == (32000, 256)


def test_load_model(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_consolidated(tmp_path, ARGS, state)
    model = load_model(tmp_path, dtype="bf16")
    assert model.args == ARGS
    assert not model.training
    for name, p in model.named_parameters():
        assert not p.requires_grad and p.device.type == "cpu" and p.dtype == torch.bfloat16, name
    # q/k/v and w1/w3 are fused on loading (one matrix multiply each, on every device) ...
    attn, ffn = model.layers[1].attention, model.layers[1].feed_forward
    names = ("wq", "wk", "wv")
    parts = [state[f"layers.1.attention.{n}.weight"].bfloat16() for n in names]
    assert torch.equal(attn.wqkv.weight, torch.cat(parts))
    parts = [state[f"layers.1.feed_forward.{n}.weight"].bfloat16() for n in ("w1", "w3")]
    assert torch.equal(ffn.w13.weight, torch.cat(parts))
    # ... and the state dict keeps the checkpoint's names and values.
    saved = model.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name].bfloat16()), name


# --- errors: each names the file, and the key where there is one --------------------------------


def load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    return str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope") == f"{tmp_path / 'nope'}: checkpoint folder not found"


def test_no_params_or_config(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"{tmp_path}: no params.json or config.json"


def test_params_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text(json.dumps(ARGS.to_params()))
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    assert "no consolidated*.safetensors (only .pth files" in load_error(tmp_path)


def test_config_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ARGS)))
    assert "config.json but no model*.safetensors" in load_error(tmp_path)


def test_missing_shard(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_hf(tmp_path, ARGS, state, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    message = load_error(tmp_path)
    assert f"{tmp_path}/model-00002-of-00002.safetensors: not found" in message
    assert "for model." in message  # names a key the index maps to that shard


def test_invalid_params_json(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_consolidated(tmp_path, ARGS, state)
    (tmp_path / "params.json").write_text("{not json")
    assert f"{tmp_path}/params.json: not valid JSON" in load_error(tmp_path)


def test_missing_key(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    write_raw(tmp_path, {k: v for k, v in state.items() if k != "layers.1.ffn_norm.weight"})
    message = load_error(tmp_path)
    assert "(consolidated.safetensors): missing key(s) layers.1.ffn_norm.weight" in message


def test_missing_key_hf_names_hf_key(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_hf(tmp_path, ARGS, state)
    hf = load_file(str(tmp_path / "model.safetensors"))
    del hf["model.layers.1.mlp.up_proj.weight"]
    save_file(hf, str(tmp_path / "model.safetensors"))
    message = load_error(tmp_path)
    assert "(model.safetensors): missing key(s) model.layers.1.mlp.up_proj.weight" in message


def test_unexpected_key(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    extra = state["layers.0.attention.wq.weight"]
    write_raw(tmp_path, {**state, "layers.2.attention.wq.weight": extra})
    file = tmp_path / "consolidated.safetensors"
    assert load_error(tmp_path) == f"{file}: unexpected key layers.2.attention.wq.weight"


def test_wrong_shape(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    write_raw(tmp_path, {**state, "layers.0.attention.wk.weight": torch.zeros(64, 32)})
    assert load_error(tmp_path) == (
        f"{tmp_path}/consolidated.safetensors: key layers.0.attention.wk.weight "
        "has shape [64, 32], expected [32, 32]"
    )


def test_wrong_shape_from_params(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    """Weights that do not fit params.json (here: fewer KV heads declared) are refused."""
    write_raw(tmp_path, state, dataclasses.replace(ARGS, n_kv_heads=1))
    assert "key layers.0.attention.wk.weight has shape [32, 32], expected [16, 32]" in load_error(
        tmp_path
    )


def test_non_float_dtype(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    write_raw(tmp_path, {**state, "norm.weight": torch.ones(32, dtype=torch.int32)})
    assert "consolidated.safetensors: key norm.weight has dtype I32" in load_error(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file(tmp_path: Path, state: dict[str, torch.Tensor], damage: str) -> None:
    save_consolidated(tmp_path, ARGS, state)
    file = tmp_path / "consolidated.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    assert load_error(tmp_path).startswith(f"{file}: not a readable safetensors file")


def test_invalid_device(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_consolidated(tmp_path, ARGS, state)
    with pytest.raises(CheckpointError, match="invalid device 'gpu0'"):
        load_checkpoint(tmp_path, device="gpu0")


def test_save_refuses_mismatched_state(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        save_consolidated(tmp_path, ARGS, {k: v for k, v in state.items() if k != "norm.weight"})


def test_names_cover_every_weight() -> None:
    names = {consolidated_to_hf_name(k) for k in expected_shapes(ARGS)}
    assert len(names) == len(expected_shapes(ARGS)) == 2 + 9 * ARGS.n_layers + 1
    assert "model.layers.1.mlp.gate_proj.weight" in names and "lm_head.weight" in names
