"""Reading images and preparing them for the model, with the exact geometry of each step.

Preprocessing follows the model's own timm data config (input size, interpolation, crop_pct,
crop_mode, mean, std), reproducing timm's eval transform step by step on PIL images. Doing the
resize and crop here, rather than through an opaque transform, gives the exact mapping from
original pixels to model-input pixels that boxes and overlays need (:class:`Geometry`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from reportgen.errors import ImageError
from reportgen.files import NotRegularFile, open_regular

# Pillow's decompression-bomb limit is kept; huge-but-legal photos are downscaled to this size
# on their longest side before anything else, so figures and memory stay bounded.
MAX_SIDE = 4096

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


#: Formats never decoded, whatever the file says it is: Pillow reads EPS by running Ghostscript
#: on the file, and untrusted PostScript is a classic way into a machine.
REFUSED_FORMATS = frozenset({"EPS"})

#: Largest image file read. Larger than the manifest's cap (10 MiB) on purpose: a camera TIFF or
#: a large PNG is often 20-100 MiB, and an uncompressed 8-bit RGB image at Pillow's pixel limit
#: (89.5 megapixels) is 256 MiB. A bigger file fails its image without being read.
MAX_IMAGE_BYTES = 320 * 1024 * 1024

#: Key in ``Image.info`` of a decoded image: its upright size before any downscaling to
#: :data:`MAX_SIDE` (see :func:`source_size`).
SOURCE_SIZE = "reportgen.source_size"


class _Refused(Exception):
    """An image refused before decoding (decompression bomb, format not allowed)."""


def open_image(path: Path) -> Image.Image:
    """Decode an image as upright 8-bit RGB.

    EXIF orientation is applied, animated images give their first frame, any mode (greyscale,
    palette, RGBA, CMYK, 16-bit) becomes RGB; transparent areas are composited on white. Images
    larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused
    before their pixels are decoded; images with a side longer than :data:`MAX_SIDE` are
    downscaled to it (their size before that is in ``info[SOURCE_SIZE]``, see
    :func:`source_size`). Formats in :data:`REFUSED_FORMATS` are never opened. Only regular files
    of at most :data:`MAX_IMAGE_BYTES` are read (a FIFO or a device is refused without waiting);
    a floating-point image with a NaN or infinite pixel is refused rather than shown black.

    Raises:
        ImageError: naming the file (by its name only, as the message may be published on the
            site), for anything that cannot be read as an image.
    """
    path = Path(path)
    name = path.name
    try:
        with _open_regular(path) as fh, warnings.catch_warnings():
            # Belt and braces: the explicit size check below is what guarantees the limit
            # (warning filters are process-wide, and images are decoded in a worker thread).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(fh, formats=_allowed_formats()) as im:
                    _check_pixels(im.size)
                    im.seek(0)
                    im = _upright(im)
                    im.load()
                    rgb = _to_rgb(im)
            except Image.UnidentifiedImageError:
                raise _Refused(_unidentified(fh)) from None
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: cannot read the file (permission denied)") from None
    except _Refused as err:
        raise ImageError(f"{name}: {err}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: {_bomb_message(err)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: could not decode the image ({err})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image") from None
    except Exception as err:  # a decoder bug on a crafted file must fail this image, not the build
        raise ImageError(f"{name}: could not decode the image ({type(err).__name__}: {err})") from None
    return _bounded(rgb)


def from_pil(image: Image.Image) -> Image.Image:
    """An image already in memory (the Python API's input) made ready as :func:`open_image`
    makes a file: upright 8-bit RGB, bounded in pixels and side length.

    Raises:
        ImageError: for an image that is too large, or whose pixels cannot be used.
    """
    try:
        _check_pixels(image.size)
        rgb = _to_rgb(_upright(image))
    except _Refused as err:
        raise ImageError(f"image: {err}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image: {_bomb_message(err)}") from None
    return _bounded(rgb if rgb is not image else image.copy())


def _bounded(rgb: Image.Image) -> Image.Image:
    """Downscale to :data:`MAX_SIDE`, recording the size before in ``info[SOURCE_SIZE]``."""
    source = rgb.size
    if max(source) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    rgb.info[SOURCE_SIZE] = source
    return rgb


def source_size(image: Image.Image) -> tuple[int, int]:
    """The upright size of the file an :func:`open_image` result came from, before downscaling.

    Boxes in the manifest, and every box the report gives, are in these pixels; multiply by
    ``image.width / source_size[0]`` (and likewise for y) to get pixels of the decoded image.
    """
    return tuple(image.info.get(SOURCE_SIZE, image.size))


def _allowed_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in Image.ID if f not in REFUSED_FORMATS)


def _check_pixels(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    w, h = size
    if limit and w * h > limit:
        raise _Refused(f"refused as a possible decompression bomb: {w}x{h} = {_bomb_limit(w * h)}")


def _bomb_limit(pixels: int) -> str:
    return f"{pixels} pixels, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)"


def _bomb_message(err: Exception) -> str:
    # Pillow's own message quotes twice the limit for its hard error; say what the limit is.
    found = re.search(r"\((\d+) pixels\)", str(err))
    detail = _bomb_limit(int(found.group(1))) if found else str(err)
    return f"refused as a possible decompression bomb: {detail}"


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, MemoryError):
        raise
    except Exception:
        # A damaged EXIF block should not cost the whole image: show it as stored.
        return im


def _open_regular(path: Path):
    """The image file opened for reading, if it is a regular, non-empty file of at most
    :data:`MAX_IMAGE_BYTES`; checked on the open descriptor, so the file checked is the file read.

    Opened without blocking: a FIFO would otherwise wait for a writer for ever.
    """
    try:
        fd, info = open_regular(path)
    except NotRegularFile as err:
        raise _Refused(f"not a regular file but {err.kind}; only regular files are read") from None
    try:
        if info.st_size == 0:
            raise _Refused("the file is empty (0 bytes)")
        if info.st_size > MAX_IMAGE_BYTES:
            raise _Refused(
                f"the file is {info.st_size / 2**20:.0f} MiB, more than the limit of "
                f"{MAX_IMAGE_BYTES // 2**20} MiB (reportgen.imaging.MAX_IMAGE_BYTES)"
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _unidentified(fh) -> str:
    try:
        fh.seek(0)
        head = fh.read(16)
    except OSError:
        head = b""
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        refused = ", ".join(sorted(REFUSED_FORMATS))
        return f"PostScript/EPS images are not accepted ({refused}: Pillow would run Ghostscript on them); convert it to PNG"
    return "not an image Pillow can read"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale 16-bit / float greyscale to 8 bits by its own range rather than clipping.
        arr = np.asarray(im, dtype=np.float64)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            # Scaled by its range, one NaN or inf would make the whole image black (or NaN).
            raise _Refused(f"{bad} of its {arr.size} pixels are NaN or infinite (a floating-point image); "
                           "only finite pixel values can be shown")
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass(frozen=True)
class Geometry:
    """Where the original image's pixels land in the model input.

    The image of size ``source`` (w, h) is resized to ``resized`` (w, h), then the window
    ``[left, left + out_w) x [top, top + out_h)`` of the resized image becomes the model input;
    negative ``left``/``top`` or a window past the edge means padding.

    Attributes:
        source: original (upright) image size, (w, h).
        resized: size after the resize step, (w, h).
        left: x of the crop window's left edge in resized pixels.
        top: y of the crop window's top edge in resized pixels.
        output: model input size, (w, h).
    """

    source: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int
    output: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        return self.resized[0] / self.source[0], self.resized[1] / self.source[1]

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original-image pixel coordinates to model-input pixel coordinates (unclipped)."""
        sx, sy = self.scale
        return x * sx - self.left, y * sy - self.top

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Model-input pixel coordinates back to original-image coordinates."""
        sx, sy = self.scale
        return (x + self.left) / sx, (y + self.top) / sy

    def map_box(self, box: tuple[float, float, float, float]) -> tuple[tuple[float, float, float, float] | None, float]:
        """Map a box ``(x0, y0, x1, y1)`` in original pixels into the model input.

        Returns:
            ``(clipped_box, visible_fraction)``: the box in model-input pixels clipped to the input
            (None when nothing of it is inside), and the fraction of its area that is inside.
        """
        x0, y0 = self.to_input(box[0], box[1])
        x1, y1 = self.to_input(box[2], box[3])
        w, h = self.output
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
        area = (x1 - x0) * (y1 - y0)
        if cx1 <= cx0 or cy1 <= cy0 or area <= 0:
            return None, 0.0
        return (cx0, cy0, cx1, cy1), (cx1 - cx0) * (cy1 - cy0) / area

    def content_box(self) -> tuple[float, float, float, float]:
        """The part of the model input covered by the image (excludes padding), in input pixels."""
        w, h = self.output
        return max(0.0, -self.left), max(0.0, -self.top), float(min(w, self.resized[0] - self.left)), float(min(h, self.resized[1] - self.top))


def _input_size(data_config: dict) -> tuple[int, int]:
    _, h, w = data_config["input_size"]
    return int(h), int(w)


def plan_geometry(source: tuple[int, int], data_config: dict) -> Geometry:
    """The resize and crop timm's eval transform would apply to an image of size ``source``.

    Mirrors ``timm.data.transforms_imagenet_eval`` for crop modes ``center``, ``squash`` and
    ``border`` (the tests compare pixels with timm's own transform).
    """
    out_h, out_w = _input_size(data_config)
    crop_pct = data_config.get("crop_pct") or 0.875
    mode = data_config.get("crop_mode") or "center"
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    w, h = source
    if mode == "squash":
        resized = (scale_w, scale_h)
    elif mode == "border" or (mode == "center" and scale_h != scale_w):
        # timm's ResizeKeepRatio: longest side (border) or shortest side (center) to the target.
        ratio_h, ratio_w = h / scale_h, w / scale_w
        ratio = max(ratio_h, ratio_w) if mode == "border" else min(ratio_h, ratio_w)
        resized = (round(w / ratio), round(h / ratio))
    elif mode == "center":
        # torchvision's Resize(int): shorter side to the size, longer side truncated.
        if w <= h:
            resized = (scale_w, int(scale_w * h / w))
        else:
            resized = (int(scale_h * w / h), scale_h)
    else:
        raise ImageError(f"unsupported crop_mode {mode!r} in the model's data config")
    left = _centre_offset(resized[0], out_w)
    top = _centre_offset(resized[1], out_h)
    return Geometry(source=(w, h), resized=resized, left=left, top=top, output=(out_w, out_h))


def _centre_offset(size: int, out: int) -> int:
    """Offset of a centred window of length ``out`` in a side of length ``size`` (negative = padding)."""
    if size >= out:
        # torchvision's CenterCrop rounds half to even, as Python's round does.
        return int(round((size - out) / 2.0))
    # timm's CenterCropOrPad puts the smaller half of the padding on the left / top.
    return -((out - size) // 2)


def preprocess(image: Image.Image, data_config: dict) -> tuple[torch.Tensor, Geometry, Image.Image]:
    """Resize, crop or pad and normalise an RGB image as the model expects.

    Returns:
        ``(tensor, geometry, model_view)``: float32 ``[3, H, W]`` normalised input, its
        :class:`Geometry`, and the un-normalised RGB image the model sees (for overlays). The
        geometry maps the pixels of the file the image came from (:func:`source_size`): for an
        image downscaled on decoding, the resize it plans from the decoded size is, per axis, the
        same scaling as from the source size, so boxes never need the decoded pixels.
    """
    geometry = plan_geometry(image.size, data_config)
    if source_size(image) != image.size:
        geometry = dataclasses.replace(geometry, source=source_size(image))
    interpolation = _INTERPOLATION.get(data_config.get("interpolation", "bilinear"), Image.Resampling.BILINEAR)
    resized = image.resize(geometry.resized, interpolation) if image.size != geometry.resized else image
    out_w, out_h = geometry.output
    mean = tuple(data_config["mean"])
    std = tuple(data_config["std"])
    fill = tuple(round(255 * v) for v in mean)
    view = Image.new("RGB", (out_w, out_h), fill)
    # Paste the visible part of the resized image at the crop window's offset (crop or pad).
    view.paste(resized, (-geometry.left, -geometry.top))
    arr = np.asarray(view, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr).permute(2, 0, 1)
    tensor = (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return tensor.contiguous(), geometry, view
