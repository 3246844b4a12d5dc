"""Hugging Face transformers ViTs: tiny random models of each family (ViT, DeiT, DINOv2 with and
without registers, CLIP's vision tower) built from configs, saved with ``save_pretrained`` and
loaded through reportgen from that folder (no download)."""

import json
import math
import time

import numpy as np
import pytest
import torch
import transformers as hf
from click.testing import CliRunner
from conftest import write_manifest, write_photo
from PIL import Image

from reportgen.cli import main
from reportgen.config import AttentionSettings, ModelSettings
from reportgen.errors import CaptureError, ModelLoadError
from reportgen.imaging import preprocess
from reportgen.methods import METHODS, create_methods
from reportgen.model.loading import load_model
from reportgen.model.runner import ModelRunner
from reportgen.model.targets import Targets
from reportgen.model.hf import data_config_from_processor, describe, forward_features, forward_head, load_hf_model
from reportgen.model.hf_capture import HFAttentionCapture, HFAttentionGradients, HFBlockGradients, HFTokenNormCapture

LABELS = {0: "tabby cat", 1: "golden retriever", 2: "goldfinch"}
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
_NAMED = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
_BIT = dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})

# family key: (model class, config, image processor, PIL twin of the processor, prefix kinds, classes)
FAMILIES = {
    "vit": (
        hf.ViTForImageClassification, hf.ViTConfig(**_TINY, intermediate_size=64, **_NAMED),
        hf.ViTImageProcessor(size={"height": 32, "width": 32}), hf.ViTImageProcessorPil, ("cls",), 3,
    ),
    "deit": (
        hf.DeiTForImageClassificationWithTeacher, hf.DeiTConfig(**_TINY, intermediate_size=64, **_NAMED),
        hf.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}),
        hf.DeiTImageProcessorPil, ("cls", "distillation"), 3,
    ),
    "dinov2": (
        hf.Dinov2Model, hf.Dinov2Config(**_TINY, mlp_ratio=2), hf.BitImageProcessor(**_BIT), hf.BitImageProcessorPil,
        ("cls",), 0,
    ),
    "dinov2-registers": (
        hf.Dinov2WithRegistersForImageClassification,
        hf.Dinov2WithRegistersConfig(**_TINY, mlp_ratio=2, num_register_tokens=2, **_NAMED),
        hf.BitImageProcessor(**_BIT), hf.BitImageProcessorPil, ("cls", "register", "register"), 3,
    ),
    "clip": (
        hf.CLIPVisionModel, hf.CLIPVisionConfig(**_TINY, intermediate_size=64),
        hf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        hf.CLIPImageProcessorPil, ("cls",), 0,
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved with save_pretrained (model and image processor) in its own folder."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for key, (model_class, config, processor, *_rest) in FAMILIES.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            model = model_class(config)
        folders[key] = root / key
        model.save_pretrained(folders[key])
        processor.save_pretrained(folders[key])
    return folders


def _load(folder):
    model, processor, info = load_hf_model(ModelSettings(name=str(folder)))
    config = data_config_from_processor(processor)
    return model, describe(model, config["input_size"][1:]), config, info


def _pixels(seed=0, batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _hand_attention(model, arch, x):
    """Each layer's softmax(q kᵀ / √d), from its query and key weights applied to its normed input
    (the hidden states the model returns with output_hidden_states), and those normed inputs."""
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    expected, normed = [], []
    for (_name, layer), h in zip(arch.layers, hidden):
        attention = getattr(layer, arch.attention)
        y = getattr(layer, arch.norm)(h).detach()
        B, N, C = y.shape
        heads = arch.heads
        d = C // heads
        q = (y @ attention.q_proj.weight.T + attention.q_proj.bias).reshape(B, N, heads, d).transpose(1, 2)
        k = (y @ attention.k_proj.weight.T + attention.k_proj.bias).reshape(B, N, heads, d).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(d)).double()
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        expected.append((e / e.sum(-1, keepdim=True)).float())
        normed.append(y)
    return expected, normed


def _hand_attention_gradients(model, arch, x, normed):
    """Each layer's d(score)/dA from O = A V: the gradient reaching the heads' outputs (the input of
    the output projection, from torch.autograd) times V, with V from the value weights."""
    outputs, handles = [], []
    for _name, layer in arch.layers:
        attention = getattr(layer, arch.attention)
        projection = getattr(attention, "o_proj", None) or attention.out_proj
        handles.append(projection.register_forward_pre_hook(lambda _m, args: outputs.append(args[0])))
    try:
        with torch.enable_grad():
            score = forward_head(model, arch, forward_features(model, arch, x), pre_logits=True).pow(2).sum()
            grads = torch.autograd.grad(score, outputs)
    finally:
        for handle in handles:
            handle.remove()
    result = []
    with torch.no_grad():
        for (_name, layer), y, grad in zip(arch.layers, normed, grads):
            attention = getattr(layer, arch.attention)
            B, N, C = y.shape
            heads, d = arch.heads, C // arch.heads
            v = (y @ attention.v_proj.weight.T + attention.v_proj.bias).reshape(B, N, heads, d).transpose(1, 2)
            result.append(grad.reshape(B, N, heads, d).transpose(1, 2) @ v.transpose(-2, -1))
    return result


@pytest.mark.parametrize("key", FAMILIES)
def test_family_loads_from_its_folder_with_eager_attention(saved, key):
    model_class, _config, _processor, _pil, kinds, classes = FAMILIES[key]
    model, arch, config, info = _load(saved[key])
    assert type(model) is model_class and model.config._attn_implementation == "eager"
    assert not model.training
    assert arch.prefix_kinds == kinds and arch.num_classes == classes and len(arch.layers) == 2
    assert config["input_size"] == (3, 32, 32)
    assert info["name"] == key and info["architecture"] == model_class.__name__
    assert key in info["source"] and str(saved[key].parent) not in info["source"]


@pytest.mark.parametrize("key", FAMILIES)
def test_captured_attention_equals_a_hand_computation(saved, key):
    model, arch, _config, _info = _load(saved[key])
    x = _pixels()
    got = {}
    with HFAttentionCapture(model, arch, lambda index, attn: got.__setitem__(index, attn.clone())) as capture:
        with torch.inference_mode():
            capture.begin()
            features = forward_features(model, arch, x)
            capture.check_complete()
    expected, _ = _hand_attention(model, arch, x)
    n = len(arch.prefix_kinds) + 16
    assert features.shape == (2, n, 32)
    assert sorted(got) == [0, 1]
    for index, attn in got.items():
        assert attn.dtype == torch.float32 and attn.shape == (2, 2, n, n)
        torch.testing.assert_close(attn, expected[index], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", FAMILIES)
def test_head_reads_the_final_tokens_as_the_model_does(saved, key):
    model, arch, _config, _info = _load(saved[key])
    x = _pixels(1)
    with torch.no_grad():
        out = model(pixel_values=x)
        head = forward_head(model, arch, forward_features(model, arch, x))
    reference = out.logits if arch.num_classes else out.pooler_output
    torch.testing.assert_close(head, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", FAMILIES)
def test_gradient_contexts_give_the_graph_tensors_and_norms(saved, key):
    model, arch, _config, _info = _load(saved[key])
    x = _pixels(2)
    attention_grads, token_grads = {}, {}
    with (
        HFAttentionGradients(model, arch, lambda i, a, g: attention_grads.__setitem__(i, (a, g))) as layers,
        HFBlockGradients(model, arch, lambda i, t, g: token_grads.__setitem__(i, (t, g))) as blocks,
        HFTokenNormCapture(model, arch) as norms,
        torch.enable_grad(),
    ):
        layers.begin()
        blocks.begin()
        features = forward_features(model, arch, x.requires_grad_(True))
        layers.check_complete()
        blocks.check_complete()
        score = forward_head(model, arch, features, pre_logits=True).pow(2).sum()
        torch.autograd.grad(score, [layers.first(), blocks.first()])
        token_norms = norms.norms()
    expected, normed = _hand_attention(model, arch, x.detach())
    expected_grads = _hand_attention_gradients(model, arch, x.detach(), normed)
    assert sorted(attention_grads) == sorted(token_grads) == [0, 1]
    for index in (0, 1):
        attn, grad = attention_grads[index]
        torch.testing.assert_close(attn, expected[index], atol=1e-5, rtol=1e-4)
        # Random transformers weights are small (std 0.02), and so are these gradients: the
        # tolerance is relative to the largest.
        scale = float(expected_grads[index].abs().max())
        assert scale > 0
        torch.testing.assert_close(grad, expected_grads[index], atol=1e-4 * scale, rtol=1e-3)
        tokens, token_grad = token_grads[index]
        torch.testing.assert_close(tokens, normed[index], atol=1e-5, rtol=1e-4)
        assert token_grad.shape == tokens.shape and token_grad.abs().sum() > 0
    # The norms of the tokens entering each layer, from the hidden states the model returns.
    with torch.no_grad():
        hidden = model(pixel_values=x.detach(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(token_norms, torch.stack([h.norm(dim=-1) for h in hidden[:2]], dim=1))
    assert all(p.grad is None for p in model.parameters())


def test_sdpa_attention_is_refused_not_skipped(saved):
    model = hf.ViTModel.from_pretrained(saved["vit"], attn_implementation="sdpa").eval()
    arch = describe(model, (32, 32))
    with HFAttentionCapture(model, arch, lambda index, attn: None) as capture, torch.inference_mode():
        capture.begin()
        forward_features(model, arch, _pixels())
        with pytest.raises(CaptureError, match="2 of 2 attention layers returned no attention.*'sdpa'.*eager"):
            capture.check_complete()
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("key", ["vit", "deit", "dinov2", "clip"])
def test_preprocessing_matches_the_image_processor(saved, key):
    """reportgen's resize, crop and normalisation from the processor's settings give the pixels
    transformers' own PIL-based processor gives."""
    pil_class = FAMILIES[key][3]
    _model, _arch, config, _info = _load(saved[key])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8), "RGB")
    ours, geometry, _view = preprocess(image, config)
    theirs = pil_class.from_pretrained(saved[key])(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    # Both resize with Pillow from the same 8-bit pixels; they round differently by at most one level.
    assert (ours - theirs).abs().max() <= 2.5 / 255 / min(config["std"])


def test_processor_settings_become_the_geometry():
    bit = data_config_from_processor(hf.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}))
    assert bit["crop_mode"] == "center" and bit["input_size"] == (3, 224, 224)
    assert math.floor(224 / bit["crop_pct"]) == 256 and bit["interpolation"] == "bicubic"
    vit = data_config_from_processor(hf.ViTImageProcessor(size={"height": 384, "width": 384}))
    assert vit["crop_mode"] == "squash" and vit["crop_pct"] == 1.0 and vit["interpolation"] == "bilinear"
    # A crop whose proportion does not give the resize back exactly is nudged until it does.
    odd = data_config_from_processor(hf.DeiTImageProcessor(size={"height": 248, "width": 248}, crop_size={"height": 224, "width": 224}))
    assert math.floor(224 / odd["crop_pct"]) == 248
    with pytest.raises(ModelLoadError, match="does not resize to a fixed size"):
        data_config_from_processor(hf.ViTImageProcessor(do_resize=False))


def test_offline_hub_name_fails_at_once_in_one_paragraph(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_hf_model(ModelSettings(name="hf:some-org/some-vit"))
    assert time.perf_counter() - started < 30  # no retry loop (a bound, not a speed target)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert "'some-org/some-vit'" in message and "offline mode is on" in message
    for advice in ("internet", "save_pretrained", "imgfocus-vits14"):
        assert advice in message


def test_folder_without_image_processor_says_what_to_save(tmp_path, saved):
    folder = tmp_path / "bare"
    hf.ViTModel.from_pretrained(saved["vit"]).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="local folder bare.*preprocessor_config.json"):
        load_hf_model(ModelSettings(name=str(folder)))


def test_model_names_are_checked_in_the_settings(tmp_path, saved):
    assert ModelSettings(name="hf:google/vit-base-patch16-224").transformers
    assert not ModelSettings(name="vit_base_patch16_224").transformers
    assert ModelSettings(name=f"hf:{saved['vit']}").name == str(saved["vit"])
    with pytest.raises(ValueError, match="expected a Hugging Face hub model"):
        ModelSettings(name="hf:not a name")
    with pytest.raises(ValueError, match="does not exist"):
        ModelSettings(name=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no config.json"):
        ModelSettings(name=str(tmp_path))
    with pytest.raises(ValueError, match="weights come from its folder"):
        ModelSettings(name="hf:google/vit-base-patch16-224", weights=tmp_path / "w.safetensors")


def test_full_clip_checkpoint_gives_its_vision_tower(tmp_path):
    config = hf.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99),
        vision_config=dict(_TINY, intermediate_size=64),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        clip = hf.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    FAMILIES["clip"][2].save_pretrained(tmp_path)
    model, arch, _config, info = _load(tmp_path)
    assert type(model) is hf.CLIPVisionModel and info["architecture"] == "CLIPVisionModel"
    x = _pixels(4)
    with torch.no_grad():
        torch.testing.assert_close(forward_head(model, arch, forward_features(model, arch, x)), clip.vision_model(pixel_values=x).pooler_output)


@pytest.mark.parametrize("key", FAMILIES)
def test_every_map_method_runs_on_each_family(saved, key):
    loaded = load_model(ModelSettings(name=str(saved[key])), device="cpu")
    kinds, classes = FAMILIES[key][4], FAMILIES[key][5]
    assert loaded.adapter.library == "transformers" and loaded.name == key
    assert loaded.grid == (4, 4) and loaded.patch_size == (8, 8) and loaded.depth == 2 and loaded.heads == 2
    assert loaded.layout.kinds() == kinds and loaded.layout.query.key == "cls"
    methods = create_methods(tuple(METHODS), AttentionSettings())
    forwards = ModelRunner(loaded, methods).run(_pixels(5))
    for forward in forwards:
        assert forward.target is not None and (forward.target.kind == "class") == bool(classes)
        for method in methods:
            out = method.maps(forward, loaded.layout)
            assert out.maps and all(grid.shape == (4, 4) and np.isfinite(grid).all() for grid in out.maps.values())
            assert np.isfinite(out.layers).all()
    assert all(p.grad is None for p in loaded.model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


@pytest.mark.parametrize("key", FAMILIES)
def test_object_targets_run_where_the_embedding_is_a_token(saved, key):
    loaded = load_model(ModelSettings(name=str(saved[key])), device="cpu")
    coverage = np.zeros((4, 4))
    coverage[:2, :2] = 1.0
    runner = ModelRunner(loaded, create_methods(("gradcam",), AttentionSettings()))
    if key == "dinov2-registers":
        # Its head reads the class token and the patch mean side by side: twice a token's width.
        with pytest.raises(CaptureError, match="embedding has 64 features and its tokens 32"):
            runner.run(_pixels(7, batch=1), objects=[[("box", coverage)]])
        return
    (forward,) = runner.run(_pixels(7, batch=1), objects=[[("box", coverage)]])
    (target, kept), = forward.other_targets[-1:]
    assert target.kind == "object" and target.object_label == "box" and -1 <= target.score <= 1
    assert all(np.isfinite(v.numpy()).all() for arrays in kept.values() for v in arrays.values())


def test_random_weights_are_reproducible_and_leave_the_global_rng_alone(saved):
    rng = torch.get_rng_state()
    a, _, info = load_hf_model(ModelSettings(name=str(saved["dinov2"]), pretrained=False))
    b, _, _ = load_hf_model(ModelSettings(name=str(saved["dinov2"]), pretrained=False))
    assert torch.equal(torch.get_rng_state(), rng) and "random initialisation" in info["source"]
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_classifier_targets_are_named_from_id2label(saved):
    loaded = load_model(ModelSettings(name=str(saved["vit"])), device="cpu")
    targets = Targets(loaded.adapter)
    assert targets.num_classes == 3 and targets.name(1) == "golden retriever"
    assert targets.resolve("Golden Retriever") == 1 and targets.resolve(2) == 2
    methods = create_methods(("gradcam",), AttentionSettings())
    (forward,) = ModelRunner(loaded, methods, chosen=(2,)).run(_pixels(6, batch=1))
    assert forward.target.class_index == 2 and forward.target.class_name == "goldfinch"
    assert "class 2 (goldfinch)" in forward.target.description
    assert {p.name for p in forward.predictions} <= set(LABELS.values())


def test_another_input_size_interpolates_the_position_embeddings(saved):
    loaded = load_model(ModelSettings(name=str(saved["vit"]), input_size=48), device="cpu")
    assert loaded.grid == (6, 6) and loaded.data_config["input_size"] == (3, 48, 48)
    (forward,) = ModelRunner(loaded, create_methods(("attention",), AttentionSettings())).run(torch.randn(1, 3, 48, 48))
    assert forward.tokens.shape == (37, 32)


def test_a_manifest_with_a_transformers_folder_builds(tmp_path, saved):
    write_photo(tmp_path / "cat.png", (48, 40), seed=1)
    manifest = write_manifest(
        tmp_path, [{"path": "cat.png", "objects": [{"label": "head", "box": [10, 5, 30, 25]}]}],
        model={"name": str(saved["deit"])}, methods=["attention", "rollout", "gradcam"],
    )
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site"), "--quiet"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "site" / "results.json").read_text(encoding="utf-8"))
    model = run["model"]
    assert model["name"] == "deit" and model["architecture"] == "DeiTForImageClassificationWithTeacher"
    assert model["grid"] == [4, 4] and model["num_prefix_tokens"] == 2
    assert "eager" in run["capture"]["method"]
    assert str(saved["deit"].parent) not in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")


def test_the_python_api_takes_a_transformers_model(saved):
    from reportgen.api import Explainer

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB")
    explanation = Explainer(f"hf:{saved['dinov2-registers']}", methods="all", device="cpu").explain(image)
    assert {"attention/mean", "rollout", "relevance", "grad-rollout", "gradcam"} <= set(explanation.maps)
    assert all(np.isfinite(m).all() and m.shape == (4, 4) for m in explanation.maps.values())


def test_a_model_folder_is_watched_and_never_inside_the_output(tmp_path, saved):
    import shutil

    from reportgen.builder import check_replaceable
    from reportgen.config import load_manifest
    from reportgen.errors import ReportgenError
    from reportgen.swap import MARKER
    from reportgen.watch import watched_paths

    folder = tmp_path / "site" / "vit"
    shutil.copytree(saved["vit"], folder)
    write_photo(tmp_path / "cat.png", (48, 40))
    manifest = load_manifest(write_manifest(tmp_path, [{"path": "cat.png"}], model={"name": "site/vit"}))
    assert manifest.model.name == str(folder)
    assert {folder / "config.json", folder / "preprocessor_config.json", folder / "model.safetensors"} <= set(
        watched_paths(manifest.path, manifest))
    (tmp_path / "site" / MARKER).touch()  # a site reportgen made, which a rebuild would replace
    with pytest.raises(ReportgenError, match="holds this build's own input"):
        check_replaceable(tmp_path / "site", manifest)


def _replayed_draws(layers, seed=0):
    """The weights the sanity check gives each layer, drawn here in its documented order: layers
    from the last, each parameter in order; matrices from normal(0, 0.02) of one generator, biases
    0, every other parameter 1."""
    generator = torch.Generator().manual_seed(seed)
    draws = {}
    for index in reversed(range(len(layers))):
        for name, p in layers[index].named_parameters():
            if p.ndim >= 2:
                draws[(index, name)] = torch.empty(p.shape).normal_(0.0, 0.02, generator=generator)
            else:
                draws[(index, name)] = torch.zeros(p.shape) if name.endswith("bias") else torch.ones(p.shape)
    return draws


@pytest.mark.parametrize("key", ["vit", "dinov2"])
def test_the_sanity_check_re_initialises_the_encoder_layers_top_down_and_restores_them(saved, key):
    from reportgen.model.sanity import cascade

    loaded = load_model(ModelSettings(name=str(saved[key])), "cpu")
    layers = [module for _name, module in loaded.adapter.arch.layers]
    assert loaded.adapter.blocks() == tuple(layers)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    draws = _replayed_draws(layers)
    seen = []
    with cascade(loaded.adapter) as steps:
        for index in steps:
            seen.append(index)
            for i, layer in enumerate(layers):
                for name, p in layer.named_parameters():
                    if i >= index:  # re-initialised: this step's layer and every one above it
                        assert torch.equal(p.detach(), draws[(i, name)]), (i, name)
                    else:
                        assert torch.equal(p.detach(), before[f"{loaded.adapter.arch.layers[i][0]}.{name}"]), (i, name)
    assert seen == [1, 0]
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    # An error inside the check still gives the weights back, bit for bit.
    with pytest.raises(RuntimeError, match="stop"):
        with cascade(loaded.adapter) as steps:
            next(iter(steps))
            raise RuntimeError("stop")
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_a_transformers_model_gets_the_sanity_check_in_a_build(tmp_path, saved):
    """The build's rank correlations of the last layer's attention against the attention captured
    here, step by step, from the re-initialised model (scipy's Spearman over the image's patches)."""
    from scipy.stats import spearmanr

    from reportgen.model.sanity import cascade

    write_photo(tmp_path / "cat.png", (48, 40), seed=1)
    manifest = write_manifest(tmp_path, [{"path": "cat.png"}], model={"name": str(saved["vit"])},
                              methods=["attention", "rollout", "gradcam"], evaluate={"random_orders": 1, "sanity": True})
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site")])
    assert result.exit_code == 0 and "left out" not in result.output, result.output
    (record,) = json.loads((tmp_path / "site" / "results.json").read_text())["images"]
    sanity = record["evaluation"]["sanity"]
    assert sanity["blocks"] == [2, 1] and sorted(sanity["spearman"]) == ["attention/max", "attention/mean", "gradcam", "rollout"]
    loaded = load_model(ModelSettings(name=str(saved["vit"])), "cpu")
    x = preprocess(Image.open(tmp_path / "cat.png").convert("RGB"), loaded.data_config)[0][None]
    inside = np.array(record["content"]["weights"]).ravel() > 0

    def last_mean():
        got = {}
        with HFAttentionCapture(loaded.model, loaded.adapter.arch, lambda i, a: got.__setitem__(i, a.clone())) as capture, \
                torch.inference_mode():
            capture.begin()
            loaded.adapter.forward_features(x)
        return got[max(got)][0, :, 0, 1:].double().mean(0).numpy()[inside]

    original = last_mean()
    with cascade(loaded.adapter) as steps:
        for step, _index in enumerate(steps):
            expected = spearmanr(original, last_mean())[0]
            assert sanity["spearman"]["attention/mean"][step] == pytest.approx(expected, abs=1e-5)
