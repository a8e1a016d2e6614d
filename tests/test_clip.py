"""CLIP text encoder: parity with transformers' CLIPTextModelWithProjection, key coverage, clear errors."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file
from tiny import clip_config, randomize
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mlx_flash.clip import CLIP_G, CLIP_L, RULES, CLIPConfig, load_clip
from mlx_flash.clip import CLIPTextModel as MLXCLIP
from mlx_flash.weights import WeightsError, check_weights, remap

BOS, EOS = 49406, 49407


def token_ids(seed: int = 0) -> np.ndarray:
    """Three 77-token rows: padded with the end token, padded with "!" (0), and a full row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, BOS, size=(3, 77))
    ids[:, 0] = BOS
    for row, (end, pad) in enumerate([(9, EOS), (30, 0), (76, EOS)]):
        ids[row, end] = EOS
        ids[row, end + 1:] = pad
    return ids


def relative_error(ours: mx.array, reference: torch.Tensor) -> float:
    reference = reference.detach().float().numpy()
    return float(np.abs(np.array(ours.astype(mx.float32)) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module", params=[("L", 2), ("G", EOS)], ids=["clip_l-quick_gelu", "clip_g-gelu"])
def clip_pair(request, tmp_path_factory):
    """(transformers model, its folder): CLIP-L with the legacy eos_token_id 2 (the highest id is pooled),
    CLIP-G with 49407 (the first end token is pooled)."""
    kind, eos_token_id = request.param
    reference = randomize(CLIPTextModelWithProjection(clip_config(kind, eos_token_id=eos_token_id)), seed=1)
    folder = tmp_path_factory.mktemp(f"clip_{kind}")
    reference.save_pretrained(folder)
    return reference, folder


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_parity_with_transformers(clip_pair, clip_skip):
    reference, folder = clip_pair
    ids = token_ids()
    with torch.no_grad():
        out = reference(torch.from_numpy(ids), output_hidden_states=True)
    hidden, pooled = load_clip(folder)(mx.array(ids), clip_skip=clip_skip)
    expected = out.hidden_states[-((clip_skip or 0) + 2)]
    errors = relative_error(hidden, expected), relative_error(pooled, out.text_embeds)
    print(f"\nCLIP {reference.config.hidden_act} clip_skip={clip_skip}: rel. error hidden {errors[0]:.2e}, "
          f"pooled {errors[1]:.2e}")
    assert hidden.shape == tuple(expected.shape) and pooled.shape == tuple(out.text_embeds.shape)
    assert max(errors) <= 1e-4


def test_half_precision(clip_pair):
    reference, folder = clip_pair
    ids = token_ids(1)
    with torch.no_grad():
        out = reference(torch.from_numpy(ids), output_hidden_states=True)
    for dtype in (mx.float16, mx.bfloat16):
        hidden, pooled = load_clip(folder, dtype=dtype)(mx.array(ids))
        errors = relative_error(hidden, out.hidden_states[-2]), relative_error(pooled, out.text_embeds)
        print(f"\nCLIP {reference.config.hidden_act} {dtype}: rel. error hidden {errors[0]:.2e}, "
              f"pooled {errors[1]:.2e}")
        assert hidden.dtype == dtype and max(errors) <= 3e-2


def test_missing_projection_is_identity(tmp_path):
    """Checkpoints of the bare text model have no text_projection: pooled = final-norm end-token state."""
    config = clip_config("L", projection_dim=32)
    reference = randomize(CLIPTextModel(config), seed=2)
    reference.save_pretrained(tmp_path)
    ids = token_ids(2)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).pooler_output
    error = relative_error(load_clip(tmp_path)(mx.array(ids))[1], expected)
    print(f"\nCLIP without projection: rel. error pooled {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parametrize("preset,hidden,layers,heads,ffn,act", [
    (CLIP_L, 768, 12, 12, 3072, "quick_gelu"),
    (CLIP_G, 1280, 32, 20, 5120, "gelu"),
])
def test_full_size_keys_and_shapes(preset, hidden, layers, heads, ffn, act):
    hf_config = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=ffn, projection_dim=hidden, hidden_act=act)
    assert CLIPConfig.from_dict(hf_config.to_dict()) == preset
    with torch.device("meta"):
        state = CLIPTextModelWithProjection(hf_config).state_dict()
    mapped = remap({k: mx.zeros(tuple(v.shape)) for k, v in state.items()}, RULES)  # lazy: never evaluated
    ours = dict(tree_flatten(MLXCLIP(preset).parameters()))
    assert set(mapped) == set(ours)
    check_weights(MLXCLIP(preset), mapped, "CLIP")


def test_clear_errors(clip_pair, tmp_path):
    reference, folder = clip_pair
    tensors = load_file(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if k != "text_model.final_layer_norm.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"1 missing \(final_layer_norm.weight\)"):
        load_clip(tmp_path)
    tensors["text_projection.weight"] = tensors["text_projection.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"mis-shaped \(text_projection.weight"):
        load_clip(tmp_path)
    model = load_clip(folder)
    with pytest.raises(ValueError, match="clip_skip=3 is out of range"):
        model(mx.array(token_ids()), clip_skip=3)
    with pytest.raises(ValueError, match="at most 77 tokens"):
        model(mx.zeros((1, 78), mx.int32))
