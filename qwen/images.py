"""qwen/images.py: open an image as the Qwen image processor is given it, for training (training/data.py,
training/setup.py) and evaluation (benchmarks/harness.py) alike: RGB, transparency on white, high bit depths
by their range, sizes the image processor refuses as a ValueError, never a crash inside the processor; and
the cheap header check the data loaders run on every record (header_problem: PIL's verify(), no pixels).

    image = load_image("figure.png", max_pixels=image_processor.size["longest_edge"])
"""
import math
import os

import numpy as np
from PIL import Image

MAX_ASPECT = 200   # Qwen2-VL's image processor (smart_resize) refuses a longer side 200 times the shorter


def check_size(width, height):
    """ValueError for an image size the image processor refuses, or one over PIL's decompression-bomb
    limit (decoding it would take gigabytes)."""
    if min(width, height) < 1 or max(width, height) / min(width, height) >= MAX_ASPECT:
        raise ValueError(f"{width}x{height} image: aspect ratio {MAX_ASPECT} or more, which the image processor refuses")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} image: over the {Image.MAX_IMAGE_PIXELS} pixel limit for decoding")


def _to_8bit(image):
    """16-bit, 32-bit integer and float images ("I;16", "I", "F") mapped to 8 bits by their real range:
    floats in [0, 1] scaled by 255, anything else stretched from its minimum to its maximum (a plain
    convert() would clip every value over 255 to white)."""
    pixels = np.asarray(image, dtype=np.float64)
    lo, hi = float(pixels.min()), float(pixels.max())
    if image.mode == "F" and 0 <= lo and hi <= 1:
        lo, hi = 0.0, 1.0
    scaled = (pixels - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def load_image(src, max_pixels=None):
    """Open an image path, bytes stream or PIL image as RGB (None stays None: a question without an
    image); ValueError if it cannot be decoded or its size is refused (`check_size`).

    Transparency is composited onto white, as Qwen2-VL's own image conversion does (a diagram with
    a transparent background would otherwise turn black). High bit-depth images are mapped by their
    range (`_to_8bit`). An image far over `max_pixels` is shrunk first: the image processor resizes
    it anyway, this only saves its time.
    """
    if src is None:
        return None
    try:
        image = src if isinstance(src, Image.Image) else Image.open(src)
        check_size(*image.size)
        image.load()
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = _to_8bit(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        name = src if isinstance(src, (str, os.PathLike)) else type(src).__name__
        raise ValueError(f"cannot read image {name}: {e}") from e
    if max_pixels and image.width * image.height > 4 * max_pixels:
        s = math.sqrt(2 * max_pixels / (image.width * image.height))
        image = image.resize((max(28, round(image.width * s)), max(28, round(image.height * s))), Image.BICUBIC)
    return image


def load_images(src, max_pixels=None):
    """load_image of one source, or of each source of a list (the images of one prompt, in order)."""
    return [load_image(s, max_pixels) for s in src] if isinstance(src, (list, tuple)) else load_image(src, max_pixels)


def header_problem(path):
    """(reason, why) if PIL cannot read the image's header (verify(): no pixel decode) or its size is
    refused (check_size), else None."""
    try:
        with Image.open(path) as image:
            image.verify()
            size = image.size
    except Exception as e:   # PIL raises OSError, SyntaxError, struct.error, DecompressionBombError, ... by format
        return "unreadable image", f"{type(e).__name__}: {e}"
    try:
        check_size(*size)
    except ValueError as e:
        return "unusable image", str(e)
    return None
