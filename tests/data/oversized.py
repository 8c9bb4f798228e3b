"""Small files that decode to huge images (decompression bombs), written without ever holding
the decoded pixels, and the peak memory of a process that is given one: the reproductions of
the pixel limit's tests."""

import os
import struct
import subprocess
import sys
import time
import zlib

# Rows compressed per zlib call: bounds the memory of writing a bomb to a few MB.
_ROWS_PER_CALL = 256


def _chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png_bomb(width=20000, height=20000):
    """A black-and-white (1 bit per pixel) PNG of one colour: 20000 x 20000 (400 million
    pixels, 1.2 GB as decoded RGB, which TF's decoder makes of any PNG) is 49 kB. (The 8-bit
    gray one the issue reports is 389 kB and takes 8 times longer to compress.)

    Returns:
        bytes.
    """
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte "none", then the row's pixels
    compressor = zlib.compressobj(6)
    parts = []
    for start in range(0, height, _ROWS_PER_CALL):
        parts.append(compressor.compress(row * min(_ROWS_PER_CALL, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. Measured from this small go-between,
# not from the test process: a child's ru_maxrss includes the memory of the process it was
# forked from, and a test process holding TensorFlow would hide what the child itself used.
_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv, tmp_path, **kwargs):
    """Runs a command; returns (CompletedProcess with text output, its own peak RSS in MB).

    Args:
        argv: the command.
        tmp_path: a folder for the measurement's file.
        **kwargs: for `subprocess.run` (cwd, env, timeout).
    """
    record = os.path.join(tmp_path, f"peak_rss_{os.getpid()}_{time.monotonic_ns()}")
    result = subprocess.run([sys.executable, "-c", _MEASURE, record, *argv],
                            capture_output=True, text=True, **kwargs)
    with open(record) as f:
        return result, int(f.read()) / 1024
