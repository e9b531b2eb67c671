"""Hostile images for the resource-limit tests: small files whose headers promise huge images."""

from __future__ import annotations

import functools
import io
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.cache
def huge_png(height: int = 20000, width: int = 20000) -> bytes:
    """A valid 8-bit grayscale PNG of `height` x `width` black pixels (about 0.4 MB for 20000 x 20000;
    a second of compression, so each size is made once)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def image(kind: str, height: int, width: int) -> bytes:
    """A small real image file (`PNG`, `JPEG`, `GIF` or `BMP`) drawn with Pillow."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buffer, format=kind)
    return buffer.getvalue()
