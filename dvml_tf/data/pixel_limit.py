"""The pixel limit: an image's size read from its encoded header, before anything is decoded.

A PNG of 20,000 x 20,000 pixels of one colour compresses to under 400 kB but decodes to 1.2 GB
(RGB): without a limit, one such file sent to a server or put in a catalogue costs gigabytes of
memory. Every place that decodes bytes it did not produce itself reads the size first, in-graph
with string ops, and refuses an image whose decoded size exceeds `max_pixels` without decoding
it: the data loaders (folder, CSV manifest, TFDS: `catalog.decode_image`), `index.py` (build
and search) and the exported `embed_bytes` signature that TF Serving runs.

Sizes are read from the header as TF's decoders use them:

* PNG: IHDR width and height.
* JPEG: `tf.image.extract_jpeg_shape` (libjpeg's own header reader, the decoder's library).
* BMP: the DIB header's width and |height| (negative heights are top-down images).
* WebP: the VP8 / VP8L bitstream header, or the VP8X canvas of an extended (animated) file.
* GIF: every frame is read by TF's decoder (giflib reads all frames, even when only the first is
  returned), and its canvas is the largest frame extent, whatever the logical screen says. So
  the blocks are walked: the size is the canvas, and the pixel count is the larger of the
  canvas area and the sum of the frame areas.

The pixel count is width x height (for a GIF, the sum of its frame areas when that is larger);
the default limit, `DEFAULT_MAX_PIXELS` = 8192 x 8192 (67 megapixels, 201 MB as decoded RGB),
admits every camera photo up to 61 MP.
A header that cannot be read (-1 sizes) is not refused here: such bytes are not an image of these
formats, and the decoder refuses them with its own message.
"""

import numpy as np
import tensorflow as tf

DEFAULT_MAX_PIXELS = 8192 * 8192
FLAG_NAME = "--max_image_pixels"
UNKNOWN = -1
# Bytes read at fixed offsets: enough for every header field used below.
_HEAD = 32
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_max_pixels(value, name=FLAG_NAME):
    """Validates a pixel limit.

    Args:
        value: the limit (int >= 1).
        name: the flag or argument, for the message.

    Returns:
        int.

    Raises:
        ValueError: not an integer >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (pixels, width x height); got "
                         f"{value!r}.")
    return int(value)


def _field_weights():
    """[_HEAD, F] int64 weights: `head @ weights` gives every header field used below at once
    (one op instead of one per byte), in the order of `_FIELDS`."""
    weights = np.zeros([_HEAD, len(_FIELDS)], np.int64)
    for column, (start, length, big_endian) in enumerate(_FIELDS.values()):
        for k in range(length):
            shift = 8 * (length - 1 - k if big_endian else k)
            weights[start + k, column] = 1 << shift
    return weights


# name: (offset, bytes, big-endian) of the integer fields read from the first _HEAD bytes.
_FIELDS = {
    "magic0": (0, 4, True), "magic4": (4, 4, True), "magic8": (8, 4, True),
    "chunk12": (12, 4, True),
    "png_width": (16, 4, True), "png_height": (20, 4, True),
    "bmp_header": (14, 4, False), "bmp_core_width": (18, 2, False),
    "bmp_core_height": (20, 2, False), "bmp_width": (18, 4, False),
    "bmp_height": (22, 4, False),
    "vp8_width": (26, 2, False), "vp8_height": (28, 2, False), "vp8l_bits": (21, 4, False),
    "vp8x_width": (24, 3, False), "vp8x_height": (27, 3, False),
}
_COLUMN = {name: i for i, name in enumerate(_FIELDS)}


def _code(text):
    return int.from_bytes(text, "big")


def _gif_size(contents):
    """(height, width, pixels) of a GIF: walks its blocks as giflib's DGifSlurp reads them."""
    length = tf.cast(tf.strings.length(contents, unit="BYTE"), tf.int64)
    padded = contents + b"\x00" * 16
    ten = tf.constant(10, tf.int64)

    def read(position):
        return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, position, ten), tf.uint8),
                       tf.int64)

    def table_size(flags):  # a colour table of 2^(n + 1) RGB entries, when flag 0x80 is set
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64),
                                                                flags % 8), 0)

    screen = read(tf.constant(6, tf.int64))
    start = 13 + table_size(screen[4])
    zero = tf.constant(0, tf.int64)

    def keep_going(position, in_blocks, width, height, area, done):
        return tf.logical_and(tf.logical_not(done), position < length)

    def step(position, in_blocks, width, height, area, done):
        b = read(position)
        # Inside the sub-blocks of an extension or of image data: skip one (its length byte and
        # data); a zero length ends them. Else a record: ',' image descriptor (left, top, width,
        # height, flags), '!' extension, ';' the trailer; anything else is an error for giflib,
        # which then reads nothing more.
        is_image = tf.equal(b[0], 0x2C)
        is_record = tf.logical_or(is_image, tf.equal(b[0], 0x21))
        left, top = b[1] + 256 * b[2], b[3] + 256 * b[4]
        frame_width, frame_height = b[5] + 256 * b[6], b[7] + 256 * b[8]
        # Descriptor (10 bytes), local colour table, LZW minimum code size (1 byte).
        record_next = tf.where(is_image, position + 11 + table_size(b[9]), position + 2)
        counted = tf.logical_and(tf.logical_not(in_blocks), is_image)
        return (tf.where(in_blocks, position + 1 + b[0], record_next),
                tf.where(in_blocks, b[0] > 0, is_record),
                tf.where(counted, tf.maximum(width, left + frame_width), width),
                tf.where(counted, tf.maximum(height, top + frame_height), height),
                area + tf.where(counted, frame_width * frame_height, zero),
                tf.logical_and(tf.logical_not(in_blocks), tf.logical_not(is_record)))

    # The canvas is the frames' extent: TF's decoder ignores the logical screen (a huge screen
    # around small frames decodes small, small screens around huge frames decode huge).
    initial = (start, tf.constant(False), zero, zero, zero, tf.constant(False))
    _, _, width, height, area, _ = tf.while_loop(keep_going, step, initial)
    size = tf.stack([height, width, tf.maximum(width * height, area)])
    # No frame: giflib decodes nothing ("does not contain any image").
    return tf.where(area > 0, size, tf.constant([UNKNOWN] * 3, tf.int64))


@tf.autograph.experimental.do_not_convert
def image_size(contents):
    """The decoded size of one encoded image, read from its header (nothing is decoded).

    Args:
        contents: scalar string tensor, an encoded PNG, JPEG, GIF, BMP or WebP file.

    Returns:
        int64 tensor [3]: (height, width, pixels), pixels = height x width (for a GIF, at
        least the sum of its frame areas); all -1 when the header is not one of these formats
        (or too short to hold the size).
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    head = tf.cast(tf.io.decode_raw(
        tf.strings.substr(contents + b"\x00" * _HEAD, 0, _HEAD), tf.uint8), tf.int64)
    length = tf.cast(tf.strings.length(contents, unit="BYTE"), tf.int64)
    field = tf.reduce_sum(head[:, tf.newaxis] * tf.constant(_field_weights()), axis=0)

    def get(name):
        return field[_COLUMN[name]]

    magic0 = get("magic0")
    is_png = tf.reduce_all([tf.equal(magic0, _code(_PNG_SIGNATURE[:4])),
                            tf.equal(get("magic4"), _code(_PNG_SIGNATURE[4:])),
                            tf.equal(get("chunk12"), _code(b"IHDR")), length >= 24])
    is_jpeg = tf.equal(tf.bitwise.right_shift(magic0, 8), _code(b"\xff\xd8\xff"))
    is_gif = tf.logical_and(tf.equal(magic0, _code(b"GIF8")), length >= 13)
    is_bmp = tf.logical_and(tf.equal(tf.bitwise.right_shift(magic0, 16), _code(b"BM")),
                            length >= 26)
    is_webp = tf.reduce_all([tf.equal(magic0, _code(b"RIFF")),
                             tf.equal(get("magic8"), _code(b"WEBP")), length >= 30])
    chunk = get("chunk12")
    core = tf.equal(get("bmp_header"), 12)  # BITMAPCOREHEADER: unsigned 16-bit sizes

    def signed(value):  # the info headers' sizes are signed: a negative height is top-down
        return tf.where(value >= 2**31, 2**32 - value, value)

    bits = get("vp8l_bits")
    # (condition, height, width), the first true one applies.
    candidates = [
        (is_png, get("png_height"), get("png_width")),
        (tf.logical_and(is_bmp, core), get("bmp_core_height"), get("bmp_core_width")),
        (is_bmp, signed(get("bmp_height")), signed(get("bmp_width"))),
        # WebP lossy: 14-bit sizes after the frame tag and the start code 9d 01 2a; lossless:
        # after the signature byte, 14 bits width - 1 then 14 bits height - 1; extended: the
        # canvas, 24 bits each, minus one.
        (tf.logical_and(is_webp, tf.equal(chunk, _code(b"VP8 "))),
         get("vp8_height") % 16384, get("vp8_width") % 16384),
        (tf.logical_and(is_webp, tf.equal(chunk, _code(b"VP8L"))),
         tf.bitwise.right_shift(bits, 14) % 16384 + 1, bits % 16384 + 1),
        (tf.logical_and(is_webp, tf.equal(chunk, _code(b"VP8X"))),
         get("vp8x_height") + 1, get("vp8x_width") + 1),
    ]
    height = width = tf.constant(UNKNOWN, tf.int64)
    for condition, h, w in reversed(candidates):
        height, width = tf.where(condition, h, height), tf.where(condition, w, width)
    fixed = tf.stack([height, width, tf.where(height >= 0, height * width, UNKNOWN)])

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
        return tf.stack([shape[0], shape[1], shape[0] * shape[1]])

    # Only these two need more than fixed offsets (and the JPEG reader fails on a bad header).
    return tf.cond(is_jpeg, jpeg,
                   lambda: tf.cond(is_gif, lambda: _gif_size(contents), lambda: fixed))


def image_sizes(contents):
    """`image_size` of every string of a batch.

    Args:
        contents: string tensor [N].

    Returns:
        int64 tensor [N, 3].
    """
    return tf.map_fn(image_size, contents, fn_output_signature=tf.TensorSpec([3], tf.int64))


def _describe(size):
    """'20000 x 20000 pixels' (with the total when it is not the product: GIF frames)."""
    return tf.strings.join([
        tf.strings.as_string(size[1]), " x ", tf.strings.as_string(size[0]), " pixels",
        tf.where(tf.equal(size[2], size[0] * size[1]), "",
                 tf.strings.join([", ", tf.strings.as_string(size[2]), " in all its frames"]))])


def within_limit(contents, max_pixels, name):
    """An in-graph check of one encoded image against the pixel limit, before decoding it.

    Args:
        contents: scalar string tensor.
        max_pixels: int >= 1.
        name: scalar string (tensor), what the image is (a file path), for the message.

    Returns:
        `contents`, with a control dependency on the check: decoding it after the check
        never starts on an image above the limit. The check fails with an InvalidArgumentError
        "image <name> is 20000 x 20000 pixels, above the limit of 67108864 pixels
        (--max_image_pixels)".
    """
    max_pixels = check_max_pixels(max_pixels)
    size = image_size(contents)
    message = tf.strings.join(["image ", name, " is ", _describe(size), ", above the limit of ",
                               str(max_pixels), f" pixels ({FLAG_NAME})"])
    check = tf.debugging.Assert(size[2] <= max_pixels, [message])
    with tf.control_dependencies([check]):
        return tf.identity(contents)


def batch_within_limit(contents, max_pixels, what):
    """An in-graph check of a batch of encoded images, naming every image above the limit.

    Args:
        contents: string tensor [N].
        max_pixels: int >= 1.
        what: the name of the input, e.g. "embed_bytes: image_bytes", for the message.

    Returns:
        `contents`, with a control dependency on the check (one InvalidArgumentError naming the
        indices and sizes of the images above the limit).
    """
    max_pixels = check_max_pixels(max_pixels)
    sizes = image_sizes(contents)
    over = tf.where(sizes[:, 2] > max_pixels)[:, 0]
    shown = tf.map_fn(
        lambda i: tf.strings.join([tf.strings.as_string(i), " (", _describe(sizes[i]), ")"]),
        over[:16], fn_output_signature=tf.TensorSpec([], tf.string))
    several = tf.size(over) > 1
    listed = tf.strings.reduce_join(shown, separator=", ")
    listed = tf.where(tf.size(over) > 16, listed + ", ...", listed)
    message = tf.strings.join([
        f"{what} at ", tf.where(several, "indices ", "index "), listed,
        tf.where(several, " are", " is"),
        f" above the limit of this model, {max_pixels} pixels (width x height; export.py "
        f"{FLAG_NAME}): downscale such images before sending them."])
    check = tf.debugging.Assert(tf.equal(tf.size(over), 0), [message])
    with tf.control_dependencies([check]):
        return tf.identity(contents)


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _sizes_function(contents):
    return image_sizes(contents)


def sizes_of(encoded):
    """The header sizes of encoded images, eagerly (a batch at once, one by one on failure).

    Args:
        encoded: list of bytes.

    Returns:
        np.int64 [len(encoded), 3] (height, width, pixels); -1 rows for bytes whose header
        cannot be read (a corrupt JPEG header: the decoder will say what is wrong).
    """
    if not encoded:
        return np.zeros([0, 3], np.int64)
    try:
        return _sizes_function(tf.constant(encoded, tf.string)).numpy()
    except tf.errors.InvalidArgumentError:
        if len(encoded) == 1:
            return np.full([1, 3], UNKNOWN, np.int64)
    return np.concatenate([sizes_of([item]) for item in encoded])


def oversized(encoded, max_pixels):
    """The images of a batch above the pixel limit, with a message for each.

    Args:
        encoded: list of bytes.
        max_pixels: int >= 1.

    Returns:
        dict {index: message}, e.g. {1: "20000 x 20000 pixels, above the limit of 67108864
        pixels (--max_image_pixels)"}.
    """
    max_pixels = check_max_pixels(max_pixels)
    sizes = sizes_of(encoded)
    return {int(i): describe_oversized(sizes[i], max_pixels)
            for i in np.flatnonzero(sizes[:, 2] > max_pixels)}


def describe_oversized(size, max_pixels):
    """'20000 x 20000 pixels, above the limit of 67108864 pixels (--max_image_pixels)'."""
    height, width, pixels = (int(v) for v in size)
    frames = "" if pixels == height * width else f", {pixels} in all its frames"
    return (f"{width} x {height} pixels{frames}, above the limit of {max_pixels} pixels "
            f"({FLAG_NAME})")
