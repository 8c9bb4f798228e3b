"""The pixel limit: image sizes read from encoded headers (checked against TF's own decoder and
PIL), GIFs whose frames exceed their screen or add up, and the in-graph check."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dvml_tf.data import pixel_limit
from dvml_tf.data.catalog import ImageCatalog
from tests.data.oversized import png_bomb


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def sample_files():
    """(name, bytes) of many formats, modes and sizes that TF's decoder reads."""
    rng = np.random.default_rng(0)
    files = []
    for width, height in ((1, 1), (3, 7), (50, 30), (257, 1031)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
        for fmt, options in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                             ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})):
            files.append((f"{fmt}{options} {width}x{height}", encode(image, fmt, **options)))
        for mode, fmt in (("L", "PNG"), ("P", "PNG"), ("1", "PNG"), ("RGBA", "PNG"),
                          ("L", "BMP"), ("P", "GIF"), ("CMYK", "JPEG"), ("L", "JPEG")):
            files.append((f"{fmt} {mode} {width}x{height}", encode(image.convert(mode), fmt)))
        frames = [Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
                  for _ in range(3)]
        for fmt in ("GIF", "PNG"):  # animated GIF, APNG
            files.append((f"animated {fmt} {width}x{height}",
                          encode(frames[0], fmt, save_all=True, append_images=frames[1:])))
    return files


def test_sizes_are_those_tf_decodes():
    files = sample_files()
    sizes = pixel_limit.sizes_of([data for _, data in files])
    for (name, data), (height, width, pixels) in zip(files, sizes, strict=True):
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False).shape
        assert (height, width) == tuple(decoded[:2]), name
        if not name.startswith("animated GIF"):
            assert pixels == height * width, name


def test_animated_webp_reads_its_canvas():
    frames = [Image.new("RGB", (70, 40), (90 * i, 0, 255 - 90 * i)) for i in range(3)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    assert data[12:16] == b"VP8X"
    np.testing.assert_array_equal(pixel_limit.sizes_of([data]), [[40, 70, 2800]])


def gif_frames(sizes, screen):
    """A GIF whose frames have the given (width, height), with its logical screen overwritten."""
    frames = [Image.new("L", size, 17 * i) for i, size in enumerate(sizes)]
    data = bytearray(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    data[6:10] = struct.pack("<HH", *screen)
    return bytes(data)


def test_gif_counts_frames_beyond_its_screen_and_all_its_frames():
    # TF's decoder takes the canvas from the frames, not from the (forgeable) logical screen.
    small_screen = gif_frames([(300, 200)], screen=(10, 10))
    assert tf.io.decode_image(small_screen, expand_animations=False).shape[:2] == (200, 300)
    huge_screen = gif_frames([(30, 20)], screen=(20000, 20000))
    assert tf.io.decode_image(huge_screen, expand_animations=False).shape[:2] == (20, 30)
    np.testing.assert_array_equal(pixel_limit.sizes_of([huge_screen]), [[20, 30, 600]])
    # giflib reads every frame, even when only the first is returned: their areas add up.
    animated = gif_frames([(120, 100)] * 5, screen=(120, 100))
    with Image.open(io.BytesIO(animated)) as image:
        assert image.n_frames == 5
    np.testing.assert_array_equal(pixel_limit.sizes_of([small_screen, animated]),
                                  [[200, 300, 60000], [100, 120, 60000]])
    assert pixel_limit.oversized([small_screen, animated], 50000) == {
        0: "300 x 200 pixels, above the limit of 50000 pixels (--max_image_pixels)",
        1: "120 x 100 pixels, 60000 in all its frames, above the limit of 50000 pixels "
           "(--max_image_pixels)"}


def test_unreadable_headers_are_left_to_the_decoder():
    good = encode(Image.new("RGB", (8, 6)), "PNG")
    corrupt_jpeg = b"\xff\xd8\xff" + b"\x00" * 50
    # Text that starts like a GIF: a "screen" of 8255 x 28526 but no frame, which giflib refuses.
    text_gif = b"GIF89a, a text file that starts like a GIF."
    sizes = pixel_limit.sizes_of([b"", b"not an image", good[:20], corrupt_jpeg, b"GIF8",
                                  text_gif, good])
    np.testing.assert_array_equal(sizes[:6], np.full((6, 3), -1))
    np.testing.assert_array_equal(sizes[6], [6, 8, 48])
    assert pixel_limit.oversized([b"junk", good], 10) == {
        1: "8 x 6 pixels, above the limit of 10 pixels (--max_image_pixels)"}


def test_a_20000_pixel_png_is_read_from_its_header(monkeypatch):
    bomb = png_bomb()
    assert len(bomb) < 100_000
    # PIL reads the header only (it refuses such sizes unless told otherwise): the oracle.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(bomb)) as image:
        assert image.size == (20000, 20000)
    np.testing.assert_array_equal(pixel_limit.sizes_of([bomb]), [[20000, 20000, 4 * 10**8]])


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "big", None])
def test_bad_limits_are_refused(value):
    with pytest.raises(ValueError, match="--max_image_pixels must be an integer >= 1"):
        pixel_limit.check_max_pixels(value)


def test_catalog_decoder_refuses_an_image_above_its_limit_naming_it():
    small = encode(Image.new("RGB", (30, 20), (200, 10, 10)), "PNG")
    catalog = ImageCatalog([0, 1], sources=[small, small], max_pixels=599, name="test")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image #1 of split test is 30 x 20 pixels, above the limit of 599 "
                             r"pixels \(--max_image_pixels\)"):
        catalog.image(1)
    # Subsets keep the limit; at the limit the image decodes.
    assert catalog.subset([0]).max_pixels == 599
    at_limit = ImageCatalog([0], sources=[small], max_pixels=600)
    assert at_limit.image(0).shape == (20, 30, 3)
