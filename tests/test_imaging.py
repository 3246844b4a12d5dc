"""Preprocessing reproduces timm's eval transform, and boxes map through it exactly."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from reportgen.errors import ImageError
from reportgen.imaging import Geometry, open_image, plan_geometry, preprocess


def _config(mode, size=(3, 64, 64), crop_pct=0.875, interpolation="bicubic"):
    return {
        "input_size": size,
        "interpolation": interpolation,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": crop_pct,
        "crop_mode": mode,
    }


def _noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(
    "mode,crop_pct,size,image_size",
    [
        ("center", 0.875, (3, 64, 64), (120, 80)),
        ("center", 0.875, (3, 64, 64), (80, 121)),
        ("center", 1.0, (3, 56, 56), (57, 200)),
        ("squash", 0.9, (3, 64, 64), (120, 80)),
        ("border", 1.0, (3, 56, 56), (120, 77)),
        ("border", 1.0, (3, 56, 56), (75, 120)),
        ("center", 0.875, (3, 48, 64), (120, 80)),
    ],
)
def test_preprocess_matches_timm_transform(mode, crop_pct, size, image_size):
    config = _config(mode, size, crop_pct)
    image = _noise(*image_size)
    expected = create_transform(**config, is_training=False)(image)
    tensor, geometry, view = preprocess(image, config)
    assert tensor.shape == expected.shape
    assert geometry.output == (size[2], size[1])
    assert view.size == geometry.output
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


def test_box_mapping_on_non_square_image_by_hand():
    # 200x100 image, 64x64 input, crop_pct 0.8 centre mode:
    # scale size floor(64/0.8) = 80 -> shorter side (h=100) to 80, so w = int(80*200/100) = 160.
    # Centre crop 64 of 160 wide: left = round(48) = 48; of 80 high: top = round(8) = 8.
    geometry = plan_geometry((200, 100), _config("center", (3, 64, 64), 0.8))
    assert geometry == Geometry(source=(200, 100), resized=(160, 80), left=48, top=8, output=(64, 64))
    # A box fully inside: (70, 20)-(120, 60) -> x*0.8-48, y*0.8-8 = (8, 8)-(48, 40).
    box, visible = geometry.map_box((70, 20, 120, 60))
    assert box == pytest.approx((8.0, 8.0, 48.0, 40.0))
    assert visible == pytest.approx(1.0)
    # Partly cut by the crop: (40, 0)-(80, 50) -> (-16, -8)-(16, 32) clipped to (0, 0)-(16, 32);
    # visible area 16*32 out of 32*40.
    box, visible = geometry.map_box((40, 0, 80, 50))
    assert box == pytest.approx((0.0, 0.0, 16.0, 32.0))
    assert visible == pytest.approx(16 * 32 / (32 * 40))
    # Wholly outside the crop (left strip of the image).
    box, visible = geometry.map_box((0, 10, 50, 90))
    assert box is None and visible == 0.0
    # And back again.
    assert geometry.to_source(8.0, 8.0) == pytest.approx((70.0, 20.0))


def test_border_mode_pads_and_content_box():
    # 120x60 image into 56x56 with border mode: longest side to 56 -> 56x28, padded 14 above.
    geometry = plan_geometry((120, 60), _config("border", (3, 56, 56), 1.0))
    assert geometry.resized == (56, 28)
    assert (geometry.left, geometry.top) == (0, -14)
    assert geometry.content_box() == (0.0, 14.0, 56.0, 42.0)
    box, visible = geometry.map_box((0, 0, 120, 60))
    assert box == pytest.approx((0.0, 14.0, 56.0, 42.0)) and visible == pytest.approx(1.0)


def test_open_image_modes_and_orientation(tmp_path):
    base = _noise(30, 20)
    cases = {
        "grey.png": base.convert("L"),
        "palette.png": base.convert("P"),
        "rgba.png": base.convert("RGBA"),
        "cmyk.jpg": base.convert("CMYK"),
        "i16.png": Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = open_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (30, 20), name
    # EXIF orientation 6 (rotate 90 clockwise to view): stored 30x20 shows as 20x30.
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "rotated.jpg").size == (20, 30)


def test_open_image_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    _noise(40, 40).save(tmp_path / "ok.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    for path in (tmp_path / "missing.png", empty, text, truncated):
        with pytest.raises(ImageError, match=path.name):
            open_image(path)
