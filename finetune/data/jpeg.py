"""Damaged-JPEG detection that decoders do not do: a file cut short whose end-of-image marker is present.

libjpeg (behind Pillow, OpenCV and ``torchvision.io.decode_jpeg``) decodes a JPEG whose entropy-coded
data stops early (the lower half of the file missing, ``FF D9`` still at the end) without an error: it
emits the warning "Corrupt JPEG data: premature end of data segment" to stderr, which none of those
Python APIs exposes, and fills every missing block with zero coefficients, i.e. uniform mid-gray
(libjpeg ``jdhuff.c``: "just leave the MCU set to zeroes ... uniform gray for the remainder of the
segment"). Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` does not help: it concerns files without the
marker, which Pillow already refuses. So deepfeat checks the file itself, in two steps:

1. :func:`jpeg_structure_problem`, for every JPEG (tens of microseconds; the marker search runs in C):
   the marker segments are complete; at least one scan, and the end-of-image marker right after the last
   scan's entropy-coded data; with restart intervals (``DRI``) every scan holds all its ``RSTn`` markers,
   in order; a progressive JPEG's scans bring every coefficient of every component to full precision
   (``Al = 0``). A file cut inside a progressive JPEG loses its last scans and fails here.
2. :func:`baseline_scan_problem`, an exact walk of the Huffman-coded data of a baseline (sequential)
   JPEG that counts the blocks the data really holds. It costs milliseconds in Python, so
   :func:`~deepfeat.finetune.data.images.load_image` runs it only when the decoded image ends in the
   mid-gray block that libjpeg's zero fill leaves (:func:`ends_in_zero_fill`): a complete file with a
   gray corner pays once, a normal photo never.

Known gap: a progressive JPEG cut inside its very last scan (the image then lacks only the last bit
of precision of some coefficients) is not detected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = ["baseline_scan_problem", "ends_in_zero_fill", "is_jpeg", "jpeg_structure_problem"]

_SOI = b"\xff\xd8"
_MARKER = re.compile(rb"\xff(?!\x00|\xff|[\xd0-\xd7])")  # a marker in entropy data: not stuffing, not RST
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_SOF_BASELINE = (0xC0, 0xC1)  # Huffman, sequential: what :func:`baseline_scan_problem` walks
_SOF_PROGRESSIVE = 0xC2
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
_LOOKAHEAD = 9


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts like a JPEG file (SOI then a marker)."""
    return data[:3] == b"\xff\xd8\xff"


@dataclass
class _Frame:
    kind: int
    height: int
    width: int
    components: dict[int, tuple[int, int]]  # id -> (h, v) sampling factors

    @property
    def hmax(self) -> int:
        return max(h for h, _ in self.components.values())

    @property
    def vmax(self) -> int:
        return max(v for _, v in self.components.values())

    def blocks(self, comp: int) -> tuple[int, int]:
        """Blocks across and down of one component (a non-interleaved scan's MCUs)."""
        h, v = self.components[comp]
        return (math.ceil(math.ceil(self.width * h / self.hmax) / 8),
                math.ceil(math.ceil(self.height * v / self.vmax) / 8))

    def mcus(self, comps: list[int]) -> int:
        if len(comps) == 1:
            across, down = self.blocks(comps[0])
            return across * down
        return math.ceil(self.width / (8 * self.hmax)) * math.ceil(self.height / (8 * self.vmax))


@dataclass
class _Scan:
    comps: list[tuple[int, int, int]]  # (component id, DC table, AC table)
    ss: int
    se: int
    ah: int
    al: int
    restart: int
    data: tuple[int, int]  # start, end of the entropy-coded bytes in the file
    rst_markers: int


@dataclass
class _Jpeg:
    frame: _Frame | None = None
    scans: list[_Scan] = field(default_factory=list)
    tables: dict[tuple[int, int], tuple[list[int], list[int]]] = field(default_factory=dict)


class _Damaged(Exception):
    pass


def _parse(data: bytes) -> _Jpeg:
    """Walk the marker segments and the scans; raise :class:`_Damaged` with the reason."""
    if not data.startswith(_SOI):
        raise _Damaged("it does not start with the JPEG start-of-image marker")
    out, restart, i, n = _Jpeg(), 0, 2, len(data)
    while True:
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 2 > n:
            raise _Damaged("the file ends before its end-of-image marker (truncated)")
        if data[i] != 0xFF:
            raise _Damaged(f"expected a marker at byte {i}, found 0x{data[i]:02x}")
        marker = data[i + 1]
        if marker == 0xD9:
            break
        if marker in _STANDALONE:
            i += 2
            continue
        if i + 4 > n:
            raise _Damaged("the file ends inside a marker segment (truncated)")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        end = i + 2 + length
        if length < 2 or end > n:
            raise _Damaged(f"the segment at byte {i} runs past the end of the file (truncated)")
        body = data[i + 4:end]
        if marker in _SOF_ANY:
            out.frame = _frame(marker, body)
        elif marker == 0xC4:
            _tables(body, out.tables)
        elif marker == 0xDD and len(body) >= 2:
            restart = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            scan = _scan_header(body, restart)
            found = _MARKER.search(data, end)
            stop = found.start() if found else n
            scan.data = (end, stop)
            scan.rst_markers = _check_restarts(data, end, stop)
            out.scans.append(scan)
            if found is None:
                raise _Damaged("the file is truncated: it ends inside scan data, without an end-of-image marker")
            end = stop
        i = end
    if out.frame is None or not out.scans:
        raise _Damaged("it has no frame header or no image scan")
    return out


def _frame(marker: int, body: bytes) -> _Frame:
    if len(body) < 6:
        raise _Damaged("its frame header is too short")
    height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
    if len(body) < 6 + 3 * count or count == 0 or width == 0:
        raise _Damaged("its frame header is damaged")
    comps = {body[6 + 3 * k]: (body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15) for k in range(count)}
    if any(h == 0 or v == 0 for h, v in comps.values()):
        raise _Damaged("its frame header has a zero sampling factor")
    return _Frame(marker, height, width, comps)


def _tables(body: bytes, tables: dict[tuple[int, int], tuple[list[int], list[int]]]) -> None:
    k = 0
    while k + 17 <= len(body):
        klass, ident = body[k] >> 4, body[k] & 15
        counts = list(body[k + 1:k + 17])
        total = sum(counts)
        symbols = list(body[k + 17:k + 17 + total])
        if len(symbols) < total:
            raise _Damaged("a Huffman table is cut short")
        tables[(klass, ident)] = (counts, symbols)
        k += 17 + total


def _scan_header(body: bytes, restart: int) -> _Scan:
    if not body:
        raise _Damaged("a scan header is empty")
    count = body[0]
    if len(body) < 1 + 2 * count + 3:
        raise _Damaged("a scan header is too short")
    comps = [(body[1 + 2 * k], body[2 + 2 * k] >> 4, body[2 + 2 * k] & 15) for k in range(count)]
    tail = body[1 + 2 * count:]
    return _Scan(comps, tail[0], tail[1], tail[2] >> 4, tail[2] & 15, restart, (0, 0), 0)


def _check_restarts(data: bytes, start: int, stop: int) -> int:
    """The number of RSTn markers in a scan's data; out-of-order ones mean lost data."""
    count = 0
    for found in _RST.finditer(data, start, stop):
        if data[found.start() + 1] - 0xD0 != count % 8:
            raise _Damaged(f"restart marker RST{data[found.start() + 1] - 0xD0} at byte {found.start()} is out "
                           f"of order (expected RST{count % 8}): part of the scan data is missing")
        count += 1
    return count


def jpeg_structure_problem(data: bytes) -> str | None:
    """Why ``data`` is a damaged JPEG, judged from its markers alone (see the module docs), or ``None``.

    Does not decode; a file that passes may still be a cut baseline JPEG, which
    :func:`baseline_scan_problem` finds.
    """
    try:
        jpeg = _parse(data)
        frame = jpeg.frame
        if frame is None:  # _parse refuses a file without one; this narrows the type
            raise _Damaged("it has no frame header")
        for number, scan in enumerate(jpeg.scans, 1):
            if any(c[0] not in frame.components for c in scan.comps):
                raise _Damaged(f"scan {number} names a component the frame does not have")
            if scan.restart:
                expected = math.ceil(frame.mcus([c[0] for c in scan.comps]) / scan.restart) - 1
                if scan.rst_markers < expected:
                    raise _Damaged(f"scan {number} holds {scan.rst_markers + 1} of its {expected + 1} restart "
                                   f"intervals: the rest of the image data is missing (truncated)")
        if frame.kind == _SOF_PROGRESSIVE:
            _check_progression(frame, jpeg.scans)
    except _Damaged as exc:
        return str(exc)
    return None


def _check_progression(frame: _Frame, scans: list[_Scan]) -> None:
    done = {comp: [False] * 64 for comp in frame.components}
    for scan in scans:
        if scan.al == 0:
            for comp, _, _ in scan.comps:
                for k in range(scan.ss, min(scan.se, 63) + 1):
                    if comp in done:
                        done[comp][k] = True
    short = sorted(comp for comp, flags in done.items() if not all(flags))
    if short:
        raise _Damaged(f"its progressive scans stop before component(s) {short} reach full precision: the "
                       f"last scans are missing (truncated)")


def ends_in_zero_fill(pixels: np.ndarray) -> bool:
    """Whether a decoded image ((H, W) gray or (H, W, 3) RGB, as stored: before any EXIF rotation) ends,
    in its bottom-right 8 x 8 block, in the flat mid-gray that libjpeg leaves where entropy-coded data is
    missing; cheap, used to decide on :func:`baseline_scan_problem`."""
    h, w = pixels.shape[:2]
    block = pixels[h - (h % 8 or 8):, w - (w % 8 or 8):].astype(np.int32)
    luma = block if block.ndim == 2 else (299 * block[..., 0] + 587 * block[..., 1] + 114 * block[..., 2]) // 1000
    return bool(np.all(np.abs(luma - 128) <= 2))


class _Huffman:
    """One Huffman table: a 9-bit lookahead (``length << 8 | symbol``, -1 for longer codes) and, per
    length, the canonical ``(first code, last code, index of its first symbol)`` for longer codes."""

    def __init__(self, counts: list[int], symbols: list[int]) -> None:
        self.symbols = symbols
        self.table = [-1] * (1 << _LOOKAHEAD)
        self.ranges: list[tuple[int, int, int]] = [(0, -1, 0)]
        code = index = 0
        for length in range(1, 17):
            first, first_index = code, index
            for _ in range(counts[length - 1]):
                if length <= _LOOKAHEAD:
                    shift = _LOOKAHEAD - length
                    for low in range(1 << shift):
                        self.table[(code << shift) | low] = (length << 8) | symbols[index]
                code += 1
                index += 1
            self.ranges.append((first, code - 1, first_index))
            code <<= 1


def baseline_scan_problem(data: bytes) -> str | None:
    """For a baseline (sequential Huffman) JPEG: why its scan data holds fewer blocks than its frame
    needs (cut short, or a code no table has), or ``None``. Other JPEGs give ``None`` (not walked).

    Decodes only the Huffman codes and skips the coefficient bits (no IDCT), a few milliseconds in
    Python for a 256 px image.
    """
    try:
        jpeg = _parse(data)
    except _Damaged as exc:
        return str(exc)
    if jpeg.frame is None or jpeg.frame.kind not in _SOF_BASELINE:
        return None
    frame = jpeg.frame
    lookups = {key: _Huffman(*value) for key, value in jpeg.tables.items()}
    for number, scan in enumerate(jpeg.scans, 1):
        comps = [c[0] for c in scan.comps]
        if any(c not in frame.components for c in comps):
            return f"scan {number} names a component the frame does not have"
        units: list[tuple[_Huffman, _Huffman]] = []
        for comp, dc, ac in scan.comps:
            if (0, dc) not in lookups or (1, ac) not in lookups:
                return f"scan {number} uses a Huffman table the file does not define"
            h, v = frame.components[comp] if len(comps) > 1 else (1, 1)
            units += [(lookups[(0, dc)], lookups[(1, ac)])] * (h * v)
        total = frame.mcus(comps)
        segments = _segments(data, *scan.data)
        per = scan.restart or total
        for k, segment in enumerate(segments):
            want = min(per, total - k * per)
            if want <= 0:
                break
            held = _count_mcus(segment, units, want)
            if held < want:
                done = k * per + held
                return (f"its image data stops after {done} of {total} blocks"
                        f"{'' if len(segments) == 1 else ' (in restart interval ' + str(k + 1) + ')'}: the rest "
                        f"of the file is missing (truncated) and would decode as flat gray")
        if len(segments) * per < total:
            return f"its image data holds {len(segments) * per} of {total} blocks (truncated)"
    return None


def _segments(data: bytes, start: int, stop: int) -> list[bytes]:
    """A scan's entropy-coded data split at its restart markers, byte stuffing removed."""
    parts, last = [], start
    for found in _RST.finditer(data, start, stop):
        parts.append(data[last:found.start()])
        last = found.end()
    parts.append(data[last:stop])
    return [p.replace(b"\xff\x00", b"\xff") for p in parts]


def _count_mcus(segment: bytes, units: list[tuple[_Huffman, _Huffman]], want: int) -> int:
    """How many of ``want`` MCUs the bits of ``segment`` hold completely."""
    bits = 8 * len(segment)
    buf = segment + b"\xff" * 8  # 1-bits past the end: a peek never runs short, and no code is all ones
    pos = 0

    def decode(huffman: _Huffman) -> int:
        nonlocal pos
        window = int.from_bytes(buf[pos >> 3:(pos >> 3) + 4], "big") >> (8 - (pos & 7)) & 0xFFFFFF
        entry = huffman.table[window >> (24 - _LOOKAHEAD)]
        if entry >= 0:
            pos += entry >> 8
            return entry & 0xFF
        for length in range(_LOOKAHEAD + 1, 17):
            code = window >> (24 - length)
            first, last, index = huffman.ranges[length]
            if first <= code <= last:
                pos += length
                return huffman.symbols[index + code - first]
        raise _Damaged("bad Huffman code")

    for mcu in range(want):
        try:
            for dc_table, ac_table in units:
                magnitude = decode(dc_table)  # DC: the symbol is the number of magnitude bits
                pos += magnitude  # (not pos += decode(...): that would read pos before decode moves it)
                k = 1
                while k < 64:
                    rs = decode(ac_table)
                    if rs & 15 == 0:
                        if rs >> 4 != 15:
                            break  # end of block
                        k += 16
                        continue
                    k += (rs >> 4) + 1
                    pos += rs & 15
        except _Damaged:
            return mcu
        if pos > bits:
            return mcu
    return want
