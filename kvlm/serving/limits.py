"""Resource limits that apply to any served model.

Every string input element that starts like a PNG, JPEG, GIF or BMP image has its
width and height read from the header (no decoding). An image above `max_pixels`
is refused with INVALID_ARGUMENT, and the memory that decoding a request's images
takes (4 bytes a pixel) is reserved from a `DecodeBudget` shared by all requests:
a request that cannot reserve it in time is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterable, Mapping

import numpy as np

from kvlm.serving.errors import exhausted, invalid

BYTES_PER_PIXEL = 4  # decoders may expand to RGBA before dropping the alpha channel
_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0..SOF15 without DHT, JPG and DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[int, int] | None:
    """`(height, width)` from a PNG, JPEG, GIF or BMP header, or None for anything else."""
    if data.startswith(_PNG) and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return height, width
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(height), abs(width)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return height, width
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        position += 2 + length
    return None


def image_sizes(arrays: Mapping[str, np.ndarray]) -> Iterable[tuple[str, int, int]]:
    """`(input name, height, width)` of every image among the string inputs."""
    for name, array in arrays.items():
        if array.dtype != object:
            continue
        for value in array.ravel():
            if isinstance(value, bytes):
                size = image_size(value)
                if size is not None:
                    yield name, *size


def decode_bytes(arrays: Mapping[str, np.ndarray], max_pixels: int) -> int:
    """The memory decoding the request's images takes; INVALID_ARGUMENT for an image above `max_pixels`."""
    total = 0
    for name, height, width in image_sizes(arrays):
        pixels = height * width
        if max_pixels and pixels > max_pixels:
            raise invalid(
                f"Input '{name}' holds an image of {height}x{width} = {pixels} pixels, above the server's limit "
                f"of {max_pixels} pixels (--max_image_pixels); it was not decoded."
            )
        total += pixels * BYTES_PER_PIXEL
    return total


class DecodeBudget:
    """Bytes of decoded images in flight, shared by all requests (0: unbounded)."""

    def __init__(self, max_bytes: int, wait_seconds: float = 1.0):
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self.in_flight = 0
        self._cond = threading.Condition()

    def acquire(self, size: int) -> None:
        """Reserves `size` bytes, waiting up to `wait_seconds`; RESOURCE_EXHAUSTED if they do not free up."""
        if not self.max_bytes or not size:
            return
        if size > self.max_bytes:
            raise exhausted(
                f"Decoding this request's images takes {size} bytes, more than the server's decode memory "
                f"({self.max_bytes} bytes, --max_decode_bytes)."
            )
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:
            while self.in_flight + size > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise exhausted(
                        f"The server's decode memory is in use ({self.in_flight} of {self.max_bytes} bytes, "
                        f"--max_decode_bytes); this request needs {size}. Retry later."
                    )
                self._cond.wait(left)
            self.in_flight += size

    def release(self, size: int) -> None:
        if not self.max_bytes or not size:
            return
        with self._cond:
            self.in_flight -= size
            self._cond.notify_all()
