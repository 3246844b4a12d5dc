"""Loading ViTs: names, local weights, random init, prefix tokens and grids, clear failures."""

import time

import pytest
import timm.layers
import torch
from conftest import TINY_MODEL, make_tiny_vit
from safetensors.torch import save_file

from reportgen.config import ModelSettings
from reportgen.errors import ModelLoadError
from reportgen.hashing import sha256_file
from reportgen.model.loading import load_model

TINY_OPTIONS = TINY_MODEL["options"]


def _tiny_settings(**changes):
    base = dict(name="vit_tiny_patch16_224", pretrained=False, input_size=32, options=TINY_OPTIONS)
    return ModelSettings(**{**base, **changes})


def test_unknown_name_suggests_close_names():
    with pytest.raises(ModelLoadError, match="Unknown model 'vit_tinyy_patch16_224'.*vit_tiny_patch16_224"):
        load_model(ModelSettings(name="vit_tinyy_patch16_224"))


def test_offline_hub_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSettings(name="vit_small_patch16_224"))
    assert time.perf_counter() - started < 30  # no retry loop (a bound, not a speed target)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    for advice in ("--weights", "imgfocus-vits14", "internet"):
        assert advice in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_round_trip(tmp_path, suffix):
    source = make_tiny_vit(img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=3, seed=7)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = load_model(_tiny_settings(weights=path, pretrained=True), device="cpu")
    assert loaded.weights_sha256 == sha256_file(path) and loaded.weights_file == path
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.forward_features(x), source.forward_features(x))


def test_local_weights_resampled_to_another_input_size(tmp_path):
    source = make_tiny_vit(img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=3)
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = load_model(_tiny_settings(weights=path, input_size=48), device="cpu")
    assert loaded.grid == (6, 6) and loaded.data_config["input_size"] == (3, 48, 48)


def test_bad_weights_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="garbage.safetensors: could not read weights"):
        load_model(_tiny_settings(weights=garbage))
    other = make_tiny_vit(img_size=32, patch_size=8, depth=3, embed_dim=24, num_heads=3)
    mismatched = tmp_path / "deeper.safetensors"
    save_file(other.state_dict(), str(mismatched))
    with pytest.raises(ModelLoadError, match="deeper.safetensors: weights do not match"):
        load_model(_tiny_settings(weights=mismatched))


@pytest.mark.parametrize(
    "name,input_size,prefix,grid",
    [
        ("vit_tiny_patch16_224", 224, 1, (14, 14)),
        ("deit_tiny_distilled_patch16_224", 224, 2, (14, 14)),
        ("vit_small_patch14_reg4_dinov2", 224, 5, (16, 16)),
        ("vit_small_patch14_dinov2", 518, 1, (37, 37)),
    ],
)
def test_prefix_tokens_and_grid_come_from_the_model(name, input_size, prefix, grid):
    loaded = load_model(ModelSettings(name=name, pretrained=False, input_size=input_size), device="cpu")
    assert loaded.num_prefix_tokens == prefix
    assert loaded.grid == grid
    assert loaded.data_config["input_size"] == (3, input_size, input_size)


def test_random_init_is_reproducible_and_leaves_global_state_alone():
    fused = timm.layers.use_fused_attn()
    rng = torch.get_rng_state()
    a = load_model(_tiny_settings(), device="cpu").model
    b = load_model(_tiny_settings(), device="cpu").model
    assert torch.equal(torch.get_rng_state(), rng)
    assert timm.layers.use_fused_attn() == fused
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_not_a_vit_is_refused():
    with pytest.raises(ModelLoadError, match="not a Vision Transformer"):
        load_model(ModelSettings(name="resnet18", pretrained=False), device="cpu")
