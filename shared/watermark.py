"""An invisible watermark carrying a 48-bit payload that survives JPEG/WebP, half size and crops.

Luma only. The image's level-2 Haar LL band (4x4 pixel means) is cut into 4x4 blocks (16x16
pixels); in each block three low-frequency coefficients of its 4x4 orthonormal DCT are set by
dithered quantization index modulation (QIM) to carry one bit. The 64 coded bits (payload and a
CRC-16) lie in an 8x8 tile of blocks, block (bx, by) carrying bit (by % 8) * 8 + bx % 8, so a crop
only shifts the tile's phase. Each tile cell has its own dithers: at a wrong phase or alignment the
votes do not add up, so the decoder finds both by the strength of the votes. The three
coefficients' dithers are a third of a step apart, so a flat block (all coefficients 0) votes
nothing. Embedding adds smooth patterns (sine bumps that are zero at the block's edges, mixed so
that each moves one coefficient) and on flat blocks moves the coefficients only part of the way.

The decoder correlates the luma with the three block kernels at every pixel (FFT), so every
alignment of the 16-pixel grid is read at once, at full size and at half size (the level-1 band
of a half-size copy is the original's level-2 band); it keeps the alignment and tile phase with
the strongest mean vote and accepts the bits only when that vote is well above what an unmarked
image of that size reaches and the CRC holds (after flipping at most two of the weakest bits).
"""

import hashlib
import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

PAYLOAD_BITS = 48
CHECK_BITS = 16
CODED_BITS = PAYLOAD_BITS + CHECK_BITS
TILE = 8  # blocks per tile side: TILE * TILE == CODED_BITS
BLOCK = 16  # pixels per block side at full size
STEP = 12.0  # QIM step, in units of the LL band's orthonormal 4x4 DCT of pixel means
COEFFICIENTS = ((0, 1), (1, 0), (1, 1))  # (row, column) frequencies in the 4x4 DCT
FLAT_STD = 6.0  # a block's luma std from which it gets the full change
MIN_STRENGTH = 0.5
MIN_CONFIDENCE = 0.3
FLIP_CANDIDATES = 4
# An unmarked image's mean |vote| is about 0.56 / sqrt(votes per cell) at one alignment; the
# best of all alignments reaches about 1.6 times that (measured), natural images a little more.
NULL_FACTOR = 3.5
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Watermark:
    """What `decode` found."""

    payload: int
    confidence: float  # mean |soft vote| at the chosen alignment, 0..1


def _crc16(payload: int) -> int:
    """CRC-16/CCITT-FALSE of the payload's 6 big-endian bytes."""
    crc = 0xFFFF
    for byte in payload.to_bytes(PAYLOAD_BITS // 8, "big"):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _coded_bits(payload: int) -> np.ndarray:
    word = (payload << CHECK_BITS) | _crc16(payload)
    return np.array([(word >> (CODED_BITS - 1 - i)) & 1 for i in range(CODED_BITS)], np.uint8)


def _payload_of(bits: np.ndarray) -> int | None:
    word = 0
    for bit in bits.tolist():
        word = (word << 1) | int(bit)
    payload = word >> CHECK_BITS
    return payload if _crc16(payload) == word & 0xFFFF else None


@cache
def _dithers() -> np.ndarray:
    """Per coefficient and tile cell, in steps: (coefficients, TILE, TILE)."""
    seed = b"txt2img-service watermark dithers v1"
    digest = hashlib.sha256(seed).digest() + hashlib.sha256(seed + b"/2").digest()
    base = np.frombuffer(digest, dtype=np.uint8)[: TILE * TILE].astype(np.float64) / 256.0
    # A third of a step apart: on a flat block the three votes cancel.
    shifts = np.arange(len(COEFFICIENTS))[:, None] / len(COEFFICIENTS)
    return ((base[None, :] + shifts) % 1.0).reshape(len(COEFFICIENTS), TILE, TILE)


def _dct4() -> np.ndarray:
    n = np.arange(4)
    matrix = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 8) * np.sqrt(2 / 4)
    matrix[0] /= np.sqrt(2)
    return matrix


@cache
def _kernels(block: int) -> np.ndarray:
    """Per coefficient, the block x block pixel weights giving it: (coefficients, block, block).

    A pixel block's level-2 Haar LL band (normalised to means) is its (block/4)-pixel means.
    """
    cell = block // 4
    dct = _dct4()
    rows = np.stack([np.repeat(dct[v], cell) / cell for v, _ in COEFFICIENTS])
    cols = np.stack([np.repeat(dct[u], cell) / cell for _, u in COEFFICIENTS])
    return np.einsum("ky,kx->kyx", rows, cols)


@cache
def _patterns() -> np.ndarray:
    """Per coefficient, a 16x16 pixel pattern giving that coefficient 1 and the other two 0."""
    # Half and full sine periods: zero at the block's edges, so neighbouring blocks' changes
    # meet without a step (plain DCT cosines left a visible 16-pixel grid on flat areas).
    x = np.arange(BLOCK) + 0.5
    waves = [np.sin(np.pi * x * (f + 1) / BLOCK) for f in range(2)]
    raw = np.stack([np.outer(waves[v], waves[u]) for v, u in COEFFICIENTS])
    response = np.einsum("kyx,jyx->jk", raw, _kernels(BLOCK))  # coefficient j of pattern k
    return np.einsum("kj,jyx->kyx", np.linalg.inv(response), raw)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ _LUMA


def _validate(payload: int) -> None:
    if not isinstance(payload, int) or isinstance(payload, bool):
        raise TypeError("payload must be an int")
    if not 0 <= payload < 1 << PAYLOAD_BITS:
        raise ValueError(f"payload must be in [0, 2**{PAYLOAD_BITS})")


def fits(image: Image.Image) -> bool:
    """Whether `image` has room for the watermark: a whole tile (128 px) on each side."""
    return min(image.size) >= TILE * BLOCK


def embed(image: Image.Image, payload: int) -> Image.Image:
    """A copy of `image` (as RGB, same size) carrying `payload`.

    An image that does not `fit` comes back unmarked; pixels past the last whole 16-pixel block
    on the right and bottom are left as they are.
    """
    _validate(payload)
    if not fits(image):
        return image.convert("RGB").copy()
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    rows, cols = height // BLOCK, width // BLOCK
    bits = _coded_bits(payload).reshape(TILE, TILE)
    cell_rows, cell_cols = np.arange(rows) % TILE, np.arange(cols) % TILE
    targets = bits[cell_rows[:, None], cell_cols[None, :]] / 2.0
    targets = targets[None] + _dithers()[:, cell_rows[:, None], cell_cols[None, :]]
    kernels, patterns = _kernels(BLOCK), _patterns()
    base = rgb.astype(np.float32)
    area = (slice(0, rows * BLOCK), slice(0, cols * BLOCK))
    blocks = _luma(base)[area].reshape(rows, BLOCK, cols, BLOCK)
    start = np.einsum("rycx,kyx->krc", blocks, kernels) / STEP
    # Texture hides the change; on flat blocks only part of the way to the lattice point (their
    # votes weaker but right).
    strength = np.clip(blocks.std(axis=(1, 3)) / FLAT_STD, MIN_STRENGTH, 1.0)
    wanted = start + strength * (np.round(start - targets) + targets - start)
    delta = np.zeros((rows, cols, len(COEFFICIENTS)), np.float64)
    out = base
    # A second pass puts back what rounding and clipping to 0..255 took off.
    for _ in range(2):
        blocks = _luma(out)[area].reshape(rows, BLOCK, cols, BLOCK)
        coefficients = np.einsum("rycx,kyx->krc", blocks, kernels) / STEP
        delta += np.moveaxis(wanted - coefficients, 0, -1) * STEP
        change = np.einsum("rck,kyx->rycx", delta, patterns).reshape(rows * BLOCK, cols * BLOCK)
        out = base.copy()
        out[area] += change[:, :, None].astype(np.float32)
        out = np.clip(np.round(out), 0, 255)
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _correlate(luma: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Each kernel's response with its top-left corner at every pixel: (coefficients, H, W)."""
    height, width = luma.shape
    spectrum = np.fft.rfft2(luma)
    padded = np.zeros((len(kernels), height, width), np.float32)
    padded[:, : kernels.shape[1], : kernels.shape[2]] = kernels
    return np.fft.irfft2(spectrum[None] * np.conj(np.fft.rfft2(padded)), s=(height, width))


def _scan(luma: np.ndarray, block: int) -> tuple[float, np.ndarray, float] | None:
    """The strongest alignment at this block size: (confidence, 64 soft votes, null level)."""
    height, width = luma.shape
    rows, cols = (height - block) // block + 1, (width - block) // block + 1
    if rows < TILE or cols < TILE:
        return None
    responses = _correlate(luma, _kernels(block)) / STEP
    phasors = np.exp(2j * np.pi * responses)
    # Pixel (y, x) is offset (y % block, x % block) of block (y // block, x // block); a block
    # whose window runs past the image (the FFT wraps around) is left out.
    size_y, size_x = -(-(rows + 1) // TILE) * TILE, -(-(cols + 1) // TILE) * TILE
    grid = np.zeros((len(COEFFICIENTS), size_y * block, size_x * block), np.complex64)
    weight = np.zeros((size_y * block, size_x * block), np.float32)
    grid[:, :height, :width] = phasors
    valid_y, valid_x = height - block + 1, width - block + 1
    weight[:valid_y, :valid_x] = 1.0
    shape = (size_y // TILE, TILE, block, size_x // TILE, TILE, block)
    grid[:, : weight.shape[0], : weight.shape[1]] *= weight
    sums = grid.reshape(len(COEFFICIENTS), *shape).sum(axis=(1, 4))  # (k, cy, oy, cx, ox)
    counts = weight.reshape(shape).sum(axis=(0, 3))  # (cy, oy, cx, ox)
    means = sums / np.maximum(counts, 1.0)
    means = means.transpose(2, 4, 0, 1, 3)  # (oy, ox, k, cy, cx)
    # Phase (py, px): true cell c is read from the decoder's cell (c - p) % TILE.
    index = (np.arange(TILE)[None, :] - np.arange(TILE)[:, None]) % TILE  # (p, c)
    rolled = means[:, :, :, index[:, None, :, None], index[None, :, None, :]]
    # rolled: (oy, ox, k, py, px, cy, cx)
    turn = np.exp(-2j * np.pi * _dithers())[:, None, None]
    votes = (rolled * turn).real.mean(axis=2)  # (oy, ox, py, px, cy, cx)
    strength = np.abs(votes).mean(axis=(-2, -1))
    best = np.unravel_index(int(np.argmax(strength)), strength.shape)
    per_cell = counts[:, best[0], :, best[1]].mean() * len(COEFFICIENTS)
    null = NULL_FACTOR * 0.56 / np.sqrt(max(per_cell, 1.0))
    return float(strength[best]), votes[best].reshape(CODED_BITS), float(null)


def _best(image: Image.Image) -> tuple[float, np.ndarray, float] | None:
    luma = _luma(np.asarray(image.convert("RGB")))
    found = None
    for block in (BLOCK, BLOCK // 2):
        scanned = _scan(luma, block)
        # Fewer votes reach higher by chance: compare scans by confidence over that level.
        if scanned is not None and (found is None or scanned[0] / scanned[2] > found[0] / found[2]):
            found = scanned
    return found


def decode(image: Image.Image) -> Watermark | None:
    """The watermark in `image`, or None if there is none (or none that checks out).

    Reads full-size and half-size copies at any crop offset; an image with fewer than 8 blocks
    (128 px at full size, 64 at half size) on a side gives None.
    """
    found = _best(image)
    if found is None:
        return None
    confidence, votes, null = found
    if confidence < max(MIN_CONFIDENCE, null):
        return None
    bits = votes < 0
    # The bits read least surely are the ones a recompression flips: try flipping up to two of
    # the weakest few (11 words in all, so the check still rejects a random word at ~1/6000).
    weakest = np.argsort(np.abs(votes))[:FLIP_CANDIDATES]
    for flips in ((), *((i,) for i in weakest), *itertools.combinations(weakest, 2)):
        trial = bits.copy()
        trial[list(flips)] ^= True
        payload = _payload_of(trial)
        if payload is not None:
            return Watermark(payload, confidence)
    return None


def bit_accuracy(image: Image.Image, payload: int) -> float:
    """The fraction of the 64 coded bits (payload and check) read right at the best alignment."""
    _validate(payload)
    found = _best(image)
    if found is None:
        return 0.0
    return float(np.mean((found[1] < 0) == _coded_bits(payload).astype(bool)))
