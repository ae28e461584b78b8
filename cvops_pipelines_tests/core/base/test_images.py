import numpy as np
import pytest
from PIL import Image

from cvops_pipelines.core.base.images import (
    ImageLimits,
    ImageRejected,
    inspect_image,
    load_rgb,
    to_rgb,
)
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus


@pytest.mark.parametrize(
    "name, code",
    [
        ("empty", "empty_file"),
        ("text", "not_an_image"),
        ("trunc_jpg", "truncated_image"),
        ("trunc_png", "truncated_image"),
        ("bomb", "decompression_bomb"),
        ("gif", "animated_image"),
    ],
)
def test_bad_inputs_get_their_reason_code(name, code):
    jpg = corpus.encode(digit_model.digit(1).convert("RGB"), "JPEG")
    png = corpus.encode(digit_model.digit(2).convert("RGB"), "PNG")
    data = {
        "empty": b"",
        "text": b"hello, not an image",
        "trunc_jpg": jpg[: len(jpg) // 2],
        "trunc_png": png[:-40],
        "bomb": corpus.png_header_only(100_000, 100_000),
        "gif": corpus.animated_gif(),
    }[name]
    with pytest.raises(ImageRejected) as err:
        inspect_image(data)
    assert err.value.code == code
    assert err.value.message  # a human sentence, not just the code


def test_size_limits_are_configurable():
    png = corpus.encode(digit_model.digit(0), "PNG")
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        inspect_image(png, ImageLimits(max_pixels=32 * 32 - 1))
    with pytest.raises(ImageRejected, match="file_too_large"):
        inspect_image(png, ImageLimits(max_bytes=len(png) - 1))


def test_accepted_image_fingerprint():
    import hashlib

    data = corpus.encode(digit_model.digit(0), "PNG")
    info = inspect_image(data)
    assert info.image_id == hashlib.sha256(data).hexdigest()
    assert (info.format, info.width, info.height, info.channels) == ("png", 32, 32, 1)
    assert len(info.phash) == 16


def test_exif_orientation_is_honoured():
    info = inspect_image(corpus.rotated_jpeg())
    assert (info.width, info.height) == (20, 40)
    assert load_rgb(corpus.rotated_jpeg()).size == (20, 40)


def test_reencoded_image_is_a_near_duplicate_by_phash():
    from cvops_pipelines.core.base.images import phash_distance

    image = digit_model.digit(0).convert("RGB")
    a = inspect_image(corpus.encode(image, "PNG"))
    b = inspect_image(corpus.encode(image, "JPEG", quality=85))
    other = inspect_image(corpus.encode(digit_model.digit(1).convert("RGB"), "PNG"))
    assert a.image_id != b.image_id
    assert phash_distance(a.phash, b.phash) <= 4 < phash_distance(a.phash, other.phash)


def test_cmyk_16bit_and_palette_alpha_are_converted_not_rejected():
    cmyk = inspect_image(corpus.encode(digit_model.digit(8).convert("RGB").convert("CMYK"), "JPEG"))
    assert (cmyk.mode, cmyk.channels) == ("CMYK", 4)
    sixteen = Image.open(__import__("io").BytesIO(corpus.sixteen_bit_png()))
    assert sixteen.mode.startswith("I")
    rgb = np.asarray(to_rgb(sixteen))
    # scaled from 16 to 8 bits, not clipped: the digit's grey levels survive
    assert np.array_equal(rgb[..., 0], np.asarray(digit_model.digit(4)))
    palette = load_rgb(corpus.palette_transparent_png())
    assert palette.mode == "RGB"


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_perceptual_hash_matches_the_reference_implementation():
    import imagehash

    from cvops_pipelines.core.base.images import perceptual_hash

    for i in range(20):
        image = digit_model.digit(i, side=64).convert("RGB")
        assert perceptual_hash(image) == str(imagehash.phash(image.resize((32, 32))))


def test_large_jpeg_size_and_near_duplicate_hash_survive_scaled_decoding():
    from cvops_pipelines.core.base.images import phash_distance

    big = digit_model.digit(5, side=480).convert("RGB")
    png, jpg = inspect_image(corpus.encode(big, "PNG")), inspect_image(corpus.encode(big, "JPEG"))
    assert (jpg.width, jpg.height) == (png.width, png.height) == (480, 480)
    assert phash_distance(png.phash, jpg.phash) <= 4
    data = corpus.encode(big, "JPEG")
    with pytest.raises(ImageRejected, match="truncated_image"):
        inspect_image(data[: len(data) * 3 // 4])  # truncation is caught at any decode scale
