"""SYNTHETIC glyphs: a procedurally rendered 47-class stand-in for EMNIST balanced.

Each image is one of the 47 EMNIST-balanced characters drawn from a TrueType font that ships
with matplotlib, then distorted like handwriting: random font, stroke width, rotation, scale,
aspect, shear, translation, a smooth elastic warp and pixel noise. Characters are size-normalised
into a ``box`` x ``box`` square and centred by their centre of mass in 28 x 28, like MNIST.
Everything is drawn from one seeded ``torch.Generator``: the same seed gives the same tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from metaplast.data.idx import DataError

log = logging.getLogger("metaplast")

# EMNIST balanced classes in its label order (the order of torchvision's EMNIST.classes).
GLYPH_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt")

# matplotlib's fonts that draw all 47 characters as ordinary Latin glyphs.
GLYPH_FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmss10",
    "cmti10",
    "cmtt10",
)

# Jitter strengths; keyword arguments of generate_glyphs / load_glyphs override them.
DEFAULT_JITTER = {
    "rotation": 10.0,  # degrees, uniform in [-rotation, rotation]
    "scale": 0.1,  # size factor uniform in [1 - scale, 1 + scale]
    "aspect": 0.1,  # extra width factor uniform in [1 - aspect, 1 + aspect]
    "shear": 0.2,  # horizontal shear uniform in [-shear, shear]
    "translate": 0.6,  # pixels, uniform in [-translate, translate] per axis
    "strokes": (0, 1, 2),  # stroke widths to pick from (render pixels, ~0.6 output pixels each;
    # negative values thin the glyph by erosion)
    "elastic": 0.45,  # std (pixels) of the smooth random displacement field's control points
    "noise": 0.03,  # std of additive Gaussian pixel noise
    "box": 20.0,  # side (pixels) of the square the character is size-normalised into
}
IMAGE_SIZE = 28
_RENDER_SIZE = 40  # font size (pixels) of the clean glyphs that get warped
_CANVAS = 64  # side of the canvas holding one clean glyph
_SUPERSAMPLE = 2  # warp at 2x resolution, then average-pool for anti-aliasing
_ELASTIC_GRID = 4  # control points per side of the elastic displacement field
_CHUNK = 1024  # images warped at a time (fixed, so the random stream never depends on it)
_CACHE_VERSION = "v1"


def font_paths() -> list[Path]:
    """Paths of the GLYPH_FONTS found in matplotlib's font directory."""
    directory = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [directory / f"{name}.ttf" for name in GLYPH_FONTS]
    found = [p for p in paths if p.exists()]
    if not found:
        raise DataError(f"no glyph fonts ({', '.join(GLYPH_FONTS)}) found in {directory}")
    return found


def _render(font: ImageFont.FreeTypeFont, char: str, stroke: int) -> np.ndarray:
    """One clean character, centred on the canvas, as float32 in [0, 1]."""
    width = max(stroke, 0)
    x0, y0, x1, y1 = font.getbbox(char, stroke_width=width)
    image = Image.new("L", (_CANVAS, _CANVAS), 0)
    origin = ((_CANVAS - (x1 - x0)) / 2 - x0, (_CANVAS - (y1 - y0)) / 2 - y0)
    ImageDraw.Draw(image).text(origin, char, fill=255, font=font, stroke_width=width, stroke_fill=255)
    if stroke < 0:
        image = image.filter(ImageFilter.MinFilter(1 - 2 * stroke))
    return np.asarray(image, dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def _clean_glyphs(strokes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean glyphs indexed (font, char, stroke) flattened, their ink extent and centre of mass.

    Returns images (F*C*S, 1, canvas, canvas), extent (F*C*S,) = larger bounding-box side and
    centre (F*C*S, 2) = (x, y) centre of mass, both in canvas pixels.
    """
    images, extents, centres = [], [], []
    coords = np.arange(_CANVAS, dtype=np.float32)
    for path in font_paths():
        font = ImageFont.truetype(str(path), _RENDER_SIZE)
        for char in GLYPH_CLASSES:
            for stroke in strokes:
                image = _render(font, char, stroke)
                rows, cols = np.nonzero(image > 0.2)
                if rows.size == 0:  # eroded away: fall back to the unthinned stroke
                    image = _render(font, char, 0)
                    rows, cols = np.nonzero(image > 0.2)
                mass = image.sum()
                images.append(image)
                extents.append(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)
                centres.append((image.sum(0) @ coords / mass, image.sum(1) @ coords / mass))
    return (
        torch.from_numpy(np.stack(images)).unsqueeze(1),
        torch.tensor(extents, dtype=torch.float32),
        torch.tensor(centres, dtype=torch.float32),
    )


def _options(jitter: dict) -> dict:
    """DEFAULT_JITTER overridden by jitter, in canonical types (floats, a tuple of ints)."""
    unknown = set(jitter) - set(DEFAULT_JITTER)
    if unknown:
        raise DataError(f"unknown glyph options {sorted(unknown)}; allowed: {sorted(DEFAULT_JITTER)}")
    options = {k: float(v) for k, v in {**DEFAULT_JITTER, **jitter}.items() if k != "strokes"}
    options["strokes"] = tuple(int(w) for w in jitter.get("strokes", DEFAULT_JITTER["strokes"]))
    if not options["strokes"] or not all(-3 <= w <= 4 for w in options["strokes"]):
        raise DataError(f"glyph strokes {options['strokes']}: need one or more widths in -3..4")
    return options


def _uniform(n: int, half_width: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * half_width


def _sampling_grid(
    centre: torch.Tensor,
    scale: torch.Tensor,
    rotation: torch.Tensor,
    shear: torch.Tensor,
    aspect: torch.Tensor,
    shift: torch.Tensor,
    displacement: torch.Tensor,
) -> torch.Tensor:
    """grid_sample grid mapping output pixels (supersampled) to clean-glyph canvas pixels.

    Output point p (in 28-pixel units, origin at the image centre) comes from canvas point
    centre + (R S H D)^-1 (p + displacement(p) - shift) / scale.
    """
    n, size = centre.shape[0], IMAGE_SIZE * _SUPERSAMPLE
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    rotate = torch.stack([cos, -sin, sin, cos], -1).view(n, 2, 2)
    shear_x = torch.stack([one, shear, zero, one], -1).view(n, 2, 2)
    stretch = torch.stack([aspect, zero, zero, one], -1).view(n, 2, 2)
    forward = rotate @ shear_x @ stretch * scale.view(n, 1, 1)
    inverse = torch.linalg.inv(forward).float()

    pixel = (torch.arange(size, dtype=torch.float32) + 0.5) / _SUPERSAMPLE - IMAGE_SIZE / 2
    out_y, out_x = torch.meshgrid(pixel, pixel, indexing="ij")
    points = torch.stack([out_x, out_y], -1).expand(n, size, size, 2)
    points = points + displacement - shift.float().view(n, 1, 1, 2)
    source = torch.einsum("nij,nhwj->nhwi", inverse, points) + centre.view(n, 1, 1, 2)
    return (2 * source + 1) / _CANVAS - 1  # canvas pixel index -> [-1, 1], align_corners=False


def generate_glyphs(per_class: int = 400, seed: int = 0, **jitter) -> tuple[torch.Tensor, torch.Tensor]:
    """Render per_class images of each of the 47 GLYPH_CLASSES.

    Returns uint8 images (47 * per_class, 28, 28) and int64 labels (class-major order).
    Keyword arguments override DEFAULT_JITTER.
    """
    if per_class < 1:
        raise DataError(f"glyphs: per_class must be >= 1, got {per_class}")
    p = _options(jitter)
    strokes = p["strokes"]
    clean, extent, centre = _clean_glyphs(strokes)
    n_fonts, n_classes, n_strokes = len(font_paths()), len(GLYPH_CLASSES), len(strokes)

    g = torch.Generator().manual_seed(seed)
    n = n_classes * per_class
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    font = torch.randint(n_fonts, (n,), generator=g)
    stroke = torch.randint(n_strokes, (n,), generator=g)
    index = (font * n_classes + labels) * n_strokes + stroke
    size = (1 + _uniform(n, p["scale"], g)) * p["box"] / extent[index].double()
    rotation = _uniform(n, math.radians(p["rotation"]), g)
    shear = _uniform(n, p["shear"], g)
    aspect = 1 + _uniform(n, p["aspect"], g)
    shift = torch.stack([_uniform(n, p["translate"], g), _uniform(n, p["translate"], g)], -1)
    control = torch.randn(n, 2, _ELASTIC_GRID, _ELASTIC_GRID, generator=g, dtype=torch.float32)
    control = control * p["elastic"]

    images = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    side = IMAGE_SIZE * _SUPERSAMPLE
    for start in range(0, n, _CHUNK):
        part = slice(start, min(start + _CHUNK, n))
        field = F.interpolate(control[part], size=(side, side), mode="bicubic", align_corners=True)
        grid = _sampling_grid(
            centre[index[part]],
            size[part],
            rotation[part],
            shear[part],
            aspect[part],
            shift[part],
            field.permute(0, 2, 3, 1),
        )
        warped = F.grid_sample(clean[index[part]], grid, align_corners=False)
        warped = F.avg_pool2d(warped, _SUPERSAMPLE).squeeze(1)
        noisy = warped + torch.randn(warped.shape, generator=g, dtype=torch.float32) * p["noise"]
        images[part] = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def glyphs_cache_path(root: str | os.PathLike, per_class: int, seed: int, **jitter) -> Path:
    """Cache file of one glyph set, named by a hash of every generation option (defaults included),
    so that a change of the defaults never reuses a stale cache."""
    key = json.dumps(_options(jitter), sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(root) / f"glyphs-{_CACHE_VERSION}-seed{seed}-n{per_class}-{digest}.pt"


def _read_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (images, labels), or None when the file is missing or unusable."""
    try:
        cached = torch.load(path, weights_only=True)
        images, labels = cached["images"], cached["labels"]
    except Exception:  # missing, truncated, corrupt or foreign file: rebuild it
        return None
    if images.dtype != torch.uint8 or images.shape != (n, IMAGE_SIZE, IMAGE_SIZE) or labels.shape != (n,):
        return None
    return images, labels


def _check_cache_location(root: Path, path: Path) -> None:
    """The cache's root must be a directory (or not exist yet) and its file must not be a directory."""
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(
                    f"glyph cache: the data root {str(root)!r} is not a directory ({str(parent)!r} is a "
                    "file); allowed: a directory (dataset.root or $METAPLAST_DATA)"
                )
            break
    if path.is_dir():
        raise DataError(
            f"glyph cache: {str(path)!r} is a directory, not a cache file; allowed: remove it "
            "(it is rebuilt), or use another dataset.root"
        )


SKIPPED = "glyph cache %s not written (%s); the glyphs are rebuilt next time"


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write the cache atomically (a private temporary file renamed over it), readable by all (0644)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as err:
        log.warning(SKIPPED, path, err.strerror or err)
        return
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would lock out other users sharing the data root
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": images, "labels": labels}, f)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        log.warning(SKIPPED, path, err.strerror or err)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_glyphs(
    root: str | os.PathLike, per_class: int = 400, seed: int = 0, **jitter
) -> tuple[torch.Tensor, torch.Tensor]:
    """generate_glyphs, cached as a .pt file under root (written atomically, mode 0644).

    A cache that cannot be read (missing, truncated, corrupt, foreign, unreadable) is rebuilt; one
    that cannot be written (read-only root, full disk) is skipped with a warning. A root that is a
    file, or a cache path that is a directory, is refused (:class:`DataError`).
    """
    path = glyphs_cache_path(root, per_class, seed, **jitter)
    _check_cache_location(Path(root), path)
    cached = _read_cache(path, len(GLYPH_CLASSES) * per_class)
    if cached is not None:
        return cached
    images, labels = generate_glyphs(per_class, seed, **jitter)
    _write_cache(path, images, labels)
    return images, labels
