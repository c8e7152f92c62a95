"""Real image files decode to the pixels a viewer shows: 16-bit images scaled (not clipped) to 8 bits, EXIF
orientation applied, CMYK converted; a control map turns with its image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from data.images import check_control, load_image, load_image_and_control, scan_image, to_rgb, upright_8bit

ORIENTATION = 0x0112  # the EXIF tag


def gradient(height: int = 24, width: int = 40) -> np.ndarray:
    """uint8 RGB with a different ramp per channel and a corner mark: any turn or flip changes it."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 128 + 0 * x], axis=-1)
    image[:4, :4] = (255, 0, 0)
    return image.round().astype(np.uint8)


def decoded(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(to_rgb(image)).astype(int)


def test_16_bit_greyscale_png_gives_its_8_bit_twin(tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    deep[0, :4] = (0, 257, 65535, 32896)  # exact levels 0, 1, 255 and 128
    Image.fromarray(deep).save(tmp_path / "deep.png")  # mode I;16, a 16-bit PNG
    Image.fromarray(np.round(deep / 257).astype(np.uint8)).save(tmp_path / "twin.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"  # what PIL's convert("RGB") clips: every value above 255 becomes white
    ours, twin = decoded(tmp_path / "deep.png"), decoded(tmp_path / "twin.png")
    assert ours.shape == (20, 30, 3) and np.abs(ours - twin).max() <= 1
    assert ours[0, :4, 0].tolist() == [0, 1, 255, 128]
    # the prepare and evaluation path (no resize at the image's own short side)
    np.testing.assert_allclose(load_image(tmp_path / "deep.png", 20), load_image(tmp_path / "twin.png", 20),
                               atol=2 / 255 + 1e-6)  # fmt: skip
    assert scan_image(tmp_path / "deep.png") == (None, False)


@pytest.mark.parametrize("dtype, mode", [(">u2", "I;16B"), (np.int32, "I")])
def test_other_16_bit_modes_scale_alike(dtype, mode):
    values = np.array([[0, 257, 1000, 65535]], dtype=dtype)
    image = Image.fromarray(values)
    assert image.mode == mode
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 1, 4, 255]


def test_16_bit_colour_key_becomes_transparency():
    image = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    image.info["transparency"] = 65535
    assert upright_8bit(image).mode == "LA"
    assert np.asarray(to_rgb(image, (0, 0, 255)))[0].tolist() == [[0, 0, 0], [0, 0, 255]]


def test_16_bit_rgb_png_gives_its_8_bit_twin(tmp_path):
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 65536, (16, 24, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep[..., ::-1])  # OpenCV writes BGR; 48-bit PNG
    twin = np.round(deep / 257).astype(np.uint8)
    assert np.abs(decoded(tmp_path / "deep.png") - twin).max() <= 1


@pytest.mark.parametrize("orientation, stored", [(6, lambda a: np.rot90(a, 1)), (8, lambda a: np.rot90(a, -1))])
def test_exif_rotated_files_give_their_upright_twin(tmp_path, orientation, stored):
    """Tag 6: the stored pixels must turn 90 degrees clockwise to be upright; tag 8: anticlockwise."""
    upright = gradient()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    sideways = Image.fromarray(np.ascontiguousarray(stored(upright)))
    sideways.save(tmp_path / "sideways.png", exif=exif)  # lossless: the pixels exactly
    assert np.array_equal(decoded(tmp_path / "sideways.png"), upright)
    # a phone photo: JPEG with the tag, against its upright twin saved at the same quality
    sideways.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    Image.fromarray(upright).save(tmp_path / "twin.jpg", quality=95)
    photo, twin = decoded(tmp_path / "photo.jpg"), decoded(tmp_path / "twin.jpg")
    assert photo.shape == upright.shape and np.abs(photo - twin).mean() < 2 and np.abs(photo - upright).mean() < 2
    assert np.abs(photo[1:3, 1:3] - (255, 0, 0)).max() < 20  # the corner mark is top-left
    assert load_image(tmp_path / "photo.jpg", 24).shape == (3, 24, 24)


def test_a_control_map_turns_with_its_image(tmp_path):
    upright = gradient()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(tmp_path / "photo.png", exif=exif)
    control = Image.fromarray(upright[..., 0])  # an edge map annotated on the upright image: no tag
    control.save(tmp_path / "control.png")
    assert check_control(tmp_path / "photo.png", tmp_path / "control.png") is None
    pixels, control_pixels = load_image_and_control(tmp_path / "photo.png", tmp_path / "control.png", 24, False)
    assert pixels.shape == (24, 24, 3) and control_pixels.shape == (24, 24)
    np.testing.assert_array_equal(pixels[..., 0], control_pixels)
    Image.fromarray(np.rot90(upright, 1)[..., 0]).save(tmp_path / "sideways_control.png")
    assert "its control map is 24x40 but the image is 40x24" in check_control(
        tmp_path / "photo.png", tmp_path / "sideways_control.png"
    )


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8, 0] = 255  # cyan on the left, yellow on the right
    cmyk[:, 8:, 2] = 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.jpg", quality=95)
    pixels = decoded(tmp_path / "print.jpg")
    assert pixels.shape == (16, 16, 3)
    assert np.abs(pixels[4, 2] - (0, 255, 255)).max() < 12 and np.abs(pixels[4, 13] - (255, 255, 0)).max() < 12


def test_float_images_are_refused_by_name(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "depth.tiff")
    error, _ = scan_image(tmp_path / "depth.tiff")
    assert "32-bit float images have no defined value range: save them as 8- or 16-bit images" in error
