"""CIFAR-10-C's corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019), re-implemented for batches of 32x32 uint8 images.

The severity parameters are those of the published generator for 32x32 images (`make_cifar_c.py`
in github.com/hendrycks/robustness, ImageNet-C/create_c), quoted in `SEVERITIES` below; the
operations follow that script, with these differences, all deliberate:
- Randomness comes from the `numpy.random.Generator` passed in (the script draws from the unseeded
  global `np.random`), so the same seed gives the same bytes on every machine.
- Only numpy, scipy and Pillow: ImageMagick's motion blur (motion_blur, snow) is re-derived from
  its MotionBlurImage (a one-sided Gaussian along the angle, edge pixels repeated; compared with
  ImageMagick by tests/test_corruptions.py where it is installed); OpenCV's filter2D, GaussianBlur
  and warpAffine are scipy.ndimage's correlate and map_coordinates with the same border rule
  (reflect-101, scipy's "mirror"); scikit-image's Gaussian filter is scipy's, which it wraps; its
  HSV conversion is matplotlib's. warpAffine quantises its sample positions to 1/32 pixel and
  scipy does not, so elastic_transform differs from the script by up to a grey level.
- Frost is left out: it needs the script's photographs of frost.
So figures on these images are not directly comparable with published CIFAR-10-C numbers (which
were also measured on the original PNG-quality test set, not a JPEG copy).

Every function maps (N, 32, 32, 3) uint8 to the same, and ends as the script does: clip to
[0, 1], scale to 255 and truncate to uint8 (np.uint8 of a float), unless the script's last step
is an 8-bit image already (motion blur, pixelate, JPEG).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from cifarflow.settings import CORRUPTIONS

SIZE = 32
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# make_cifar_c.py's `c = [...][severity - 1]` of each corruption, for severities 1..5.
SEVERITIES: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # noise standard deviation
    "shot_noise": [500, 250, 100, 75, 50],  # photons at full scale
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # fraction of values set to 0 or 1
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # disk radius, anti-alias sigma
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, max shift, passes
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # ImageMagick radius, sigma
    "zoom_blur": [np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)],  # zoom factors averaged
    "snow": [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),  # mean, std, zoom, threshold, blur radius, blur sigma, image weight
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # strength, plasma wibble decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor towards the per-channel mean
    "elastic_transform": [  # displacement scale, its smoothing sigma, affine jitter; IMSIZE = 32
        (SIZE * 0, SIZE * 0, SIZE * 0.08),
        (SIZE * 0.05, SIZE * 0.2, SIZE * 0.07),
        (SIZE * 0.08, SIZE * 0.06, SIZE * 0.06),
        (SIZE * 0.1, SIZE * 0.04, SIZE * 0.05),
        (SIZE * 0.1, SIZE * 0.03, SIZE * 0.03),
    ],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # downscale factor (box filter both ways)
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)  # truncates, as the script's np.uint8(...)


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 255.0


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["gaussian_noise"][severity - 1]
    x = _unit(images)
    return _to_uint8(x + rng.normal(size=x.shape, scale=c))


def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["shot_noise"][severity - 1]
    return _to_uint8(rng.poisson(_unit(images) * c) / c)


def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper per value (as scikit-image's random_noise 's&p'): a fraction `c` of the
    values, each channel on its own, set to 0 or 1 with equal odds."""
    c = SEVERITIES["impulse_noise"][severity - 1]
    x = _unit(images)
    flipped = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x[flipped & salt] = 1.0
    x[flipped & ~salt] = 0.0
    return _to_uint8(x)


def _gaussian_blur(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """scikit-image's `gaussian` over the two spatial axes of (N, H, W[, C])."""
    sigmas = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The script's anti-aliased disk kernel for radii up to 8 (all of its severities): a 17x17
    indicator of the disk, normalised, then OpenCV's 3x3 GaussianBlur (reflect-101 border) with
    sigma `alias_blur`."""
    steps = np.arange(-8, 9)
    xx, yy = np.meshgrid(steps, steps)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-((np.arange(3) - 1) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    return ndimage.correlate(disk, np.outer(g, g).astype(np.float32), mode="mirror")


def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = SEVERITIES["defocus_blur"][severity - 1]
    kernel = _disk(radius, alias_blur)
    x = ndimage.correlate(_unit(images), kernel[None, :, :, None], mode="mirror")  # filter2D per channel
    return _to_uint8(x)


def glass_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, jitter each pixel by up to one step up and left, `passes` times, then blur again.

    The script loops from the bottom-right pixel to the top-left one and "swaps" each with a
    neighbour `randint(-1, 1)` away (0 or -1 on each axis) through `a, b = b, a` on two numpy
    views, which copies one way only: the pixel takes its neighbour's value and the neighbour keeps
    its own. That neighbour lies up or left, so the loop has not reached it yet: each pass is one
    gather from the values the pass started with, done here for all pixels at once (the script's
    loop bounds: rows and columns 2..31; its max shift is 1 at every severity)."""
    sigma, shift, passes = SEVERITIES["glass_blur"][severity - 1]
    assert shift == 1, "the one-pass gather below holds only for the script's max shift of 1"
    x = _to_uint8(_gaussian_blur(_unit(images), sigma))
    n = np.arange(len(x))[:, None, None]
    inner = np.arange(shift + 1, SIZE)  # range(32 - shift, shift, -1), in any order
    rows, cols = np.meshgrid(inner, inner, indexing="ij")
    for _ in range(passes):
        dx, dy = rng.integers(-shift, shift, size=(2, len(x), len(inner), len(inner)))
        x[n, rows, cols] = x[n, rows + dy, cols + dx]  # the right side is read whole before the write
    return _to_uint8(_gaussian_blur(x / 255.0, sigma))


def imagemagick_motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage on one uint8 image (H, W[, C]): width = 2*ceil(radius)+1 taps
    with weights exp(-i^2 / 2 sigma^2), i = 0..width-1, normalised; tap i reads the pixel
    (round(i cos a), round(i sin a)) away (x right, y down; ceil(v - 0.5) as ImageMagick rounds),
    edge pixels repeated beyond the border. Back to 8 bits as ImageMagick Q16 does: rounded to
    16 bits, then 16 -> 8 truncated (bit-exact against ImageMagick 6.9 on 122,880 values)."""
    width = int(2 * np.ceil(radius) + 1)
    taps = np.arange(width)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    a = np.deg2rad(angle)
    off_x = np.ceil(taps * np.cos(a) - 0.5).astype(np.int64)
    off_y = np.ceil(taps * np.sin(a) - 0.5).astype(np.int64)
    rows, cols = np.arange(image.shape[0]), np.arange(image.shape[1])
    out = np.zeros(image.shape, np.float64)
    for weight, dx, dy in zip(weights, off_x, off_y, strict=True):
        r = np.clip(rows + dy, 0, image.shape[0] - 1)
        c = np.clip(cols + dx, 0, image.shape[1] - 1)
        out += weight * image[r][:, c]
    q16 = np.floor(out * 257 + 0.5)
    return np.clip(np.floor(q16 / 257), 0, 255).astype(np.uint8)


def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = SEVERITIES["motion_blur"][severity - 1]
    angles = rng.uniform(-45, 45, size=len(images))
    return np.stack([imagemagick_motion_blur(im, radius, sigma, a) for im, a in zip(images, angles, strict=True)])


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The script's clipped_zoom over axes 1 and 2 of (N, H, W, C): zoom the centre crop of side
    ceil(H / factor) with scipy (linear), then trim the centre H x W."""
    h = x.shape[1]
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    zoomed = ndimage.zoom(x[:, top : top + crop, top : top + crop], (1, factor, factor, 1), order=1)
    trim = (zoomed.shape[1] - h) // 2
    return zoomed[:, trim : trim + h, trim : trim + h]


def zoom_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factors = SEVERITIES["zoom_blur"][severity - 1]
    x = _unit(images).astype(np.float32)
    out = np.zeros_like(x)
    for factor in factors:
        out += _clipped_zoom(x, factor)
    return _to_uint8((x + out) / (len(factors) + 1))


def _grey(x: np.ndarray) -> np.ndarray:
    """OpenCV's RGB2GRAY on floats, keeping a channel axis."""
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def snow(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, weight = SEVERITIES["snow"][severity - 1]
    x = _unit(images).astype(np.float32)
    layer = rng.normal(size=(len(x), SIZE, SIZE, 1), loc=mean, scale=std)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    flakes = _to_uint8(layer[..., 0])  # an 8-bit grey image, as the script hands ImageMagick
    angles = rng.uniform(-135, -45, size=len(x))
    blurred = np.stack([imagemagick_motion_blur(f, radius, sigma, a) for f, a in zip(flakes, angles, strict=True)])
    layer = (blurred / 255.0)[..., None]
    x = weight * x + (1 - weight) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return _to_uint8(x + layer + np.rot90(layer, k=2, axes=(1, 2)))


def _plasma(n: int, decay: float, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """The script's diamond-square height map (its wibble, up to wibble^2 of noise, kept), n at once, in [0, 1]."""
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=1)
        square += np.roll(square, -1, axis=2)
        m[:, half:size:step, half:size:step] = wibbled_mean(square)
        down_right = m[:, half:size:step, half:size:step]
        up_left = m[:, 0:size:step, 0:size:step]
        left = down_right + np.roll(down_right, 1, axis=1) + up_left + np.roll(up_left, -1, axis=2)
        m[:, 0:size:step, half:size:step] = wibbled_mean(left)
        top = down_right + np.roll(down_right, 1, axis=2) + up_left + np.roll(up_left, -1, axis=1)
        m[:, half:size:step, 0:size:step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def fog(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = SEVERITIES["fog"][severity - 1]
    x = _unit(images)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma(len(x), decay, rng)[..., None]
    return _to_uint8(x * peak / (peak + strength))


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    c = SEVERITIES["brightness"][severity - 1]
    hsv = rgb_to_hsv(_unit(images))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _to_uint8(hsv_to_rgb(hsv))


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["contrast"][severity - 1]
    x = _unit(images)
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - means) * c + means)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """OpenCV's getAffineTransform: the 2x3 matrix taking three (x, y) points `src` to `dst`."""
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def elastic_transform(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp of three points (OpenCV's warpAffine, linear, reflect-101 border),
    then a smooth random displacement field (linear, half-sample reflection)."""
    scale, smooth, jitter = SEVERITIES["elastic_transform"][severity - 1]
    x = _unit(images).astype(np.float32)
    n = len(x)
    centre, square = SIZE // 2, SIZE // 3
    src = np.float32([[centre + square] * 2, [centre + square, centre - square], [centre - square] * 2])
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    ones = np.ones_like(xx)
    index = np.broadcast_to(np.arange(n)[:, None, None, None], (n, SIZE, SIZE, 3))
    channel = np.broadcast_to(np.arange(3), (n, SIZE, SIZE, 3))
    src_x, src_y = np.empty((n, SIZE, SIZE)), np.empty((n, SIZE, SIZE))
    for i in range(n):
        dst = src + rng.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
        inverse = np.linalg.inv(np.vstack([_affine_from_points(src, dst), [0, 0, 1]]))  # dst pixel -> src position
        src_x[i] = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2] * ones
        src_y[i] = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2] * ones
    coords = [index, np.repeat(src_y[..., None], 3, -1), np.repeat(src_x[..., None], 3, -1), channel]
    x = ndimage.map_coordinates(x, coords, order=1, mode="mirror")
    fields = rng.uniform(-1, 1, size=(2, n, SIZE, SIZE))
    dx, dy = (_gaussian_blur(f, smooth, mode="reflect", truncate=3) * scale for f in fields)
    coords = [index, yy[None, :, :, None] + dy[..., None], xx[None, :, :, None] + dx[..., None], channel]
    x = ndimage.map_coordinates(x, np.broadcast_arrays(*coords), order=1, mode="reflect")
    return _to_uint8(x)


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    c = SEVERITIES["pixelate"][severity - 1]
    side = int(SIZE * c)
    box = Image.Resampling.BOX
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), box).resize((SIZE, SIZE), box)) for im in images])


def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = SEVERITIES["jpeg_compression"][severity - 1]

    def roundtrip(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("RGB"))

    return np.stack([roundtrip(im) for im in images])


# CIFAR-10-C's order and file names (frost left out: see the module docstring), as the settings
# name them (their list, which needs no scipy): one function here per name there.
FAMILIES: dict[str, Corruption] = {name: globals()[name] for name in CORRUPTIONS}


def corrupt(images: np.ndarray, family: str, severity: int, seed: int) -> np.ndarray:
    """`images` under one corruption at one severity (1..5). The generator is seeded by (seed,
    family's place in FAMILIES, severity), so each cell's bytes depend on nothing else."""
    if family not in FAMILIES:
        raise ValueError(f"unknown corruption {family!r}; known: {', '.join(FAMILIES)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity {severity!r}: must be 1..5")
    rng = np.random.default_rng([seed, list(FAMILIES).index(family), severity])
    out = FAMILIES[family](np.ascontiguousarray(images, np.uint8), severity, rng)
    assert out.shape == images.shape and out.dtype == np.uint8, (family, out.shape, out.dtype)
    return out
