"""The generated quickstart corpus: real mp4s of moving textured shapes with exact ground truth.

Each video shows 1-4 textured shapes (all of different shapes and colours, so a name like
"red circle" and a motion subject like "the circle" are unambiguous) moving, rotating and
scaling over a textured, static background, occluding each other by a fixed z-order. Written
per video, beside each other in ``<out>/videos/``:

* ``<video_id>.mp4``: H.264 (libx264, yuv420p, CRF 18), 8/12/24/30 fps, 2.5-4 s long (so every
  video gives at least one 16-frame clip at 8 fps, the default clip config).
* ``<video_id>_manual.json``: the exact visible pixels of every object (after occlusion) in
  SA-V format (:mod:`ttm_ray.dataset.sav_format`). Annotated every ``annotation_stride``
  video frames (default 1: every frame); the format has no stride key, the reader derives it
  from ``video_frame_count`` and ``len(masklet)``. ``masklet_id`` k is ``object_prompts[k]``.

plus ``<out>/manifest.jsonl`` and ``<out>/manifest.parquet`` (same rows, columns in
:data:`MANIFEST_SCHEMA`; paths relative to ``<out>``). ``num_corrupt`` adds broken inputs
cycling through :data:`CORRUPT_KINDS`.

Design choices:

* Everything is drawn with hard edges (no anti-aliasing) from one render-time object-id map,
  so a mask is exactly ``id_map == k + 1`` and tests can compare masks to pixels.
* Sizes are even (yuv420p halves chroma, so libx264 refuses odd sizes) but deliberately
  not multiples of 16 and mostly non-square (250x190, 176x144, 240x320 ...), which exercises
  H.264's cropping and the resize/crop code downstream.
* Textures have periods of at least 6 px so the lossy encode stays close to the rendered
  frames (mean absolute error of a few levels); tests check that.
* Layouts where an object hides behind another for most of the video are redrawn
  (:func:`well_visible`); crossing paths, so brief occlusions, are made on purpose.
* Same seed, same bytes: the spec comes from ``numpy.random.default_rng([seed, index,
  attempt])``, the encoder runs single-threaded on x264's C code (its SIMD reads
  uninitialised memory) with bit-exact flags, and nothing time-dependent is written. (Bytes
  can differ between FFmpeg/x264 builds, i.e. PyAV wheels; pixels and masks do not.)
* Broken inputs (``num_corrupt``) cycle through :data:`CORRUPT_KINDS`: ``truncated`` (a valid
  mp4 cut at 40%, losing its index), ``zero_bytes``, ``text_file`` (text named ``.mp4``),
  ``bad_container`` (an mp4 ``ftyp`` box then garbage) and ``single_frame`` (a valid 1-frame
  mp4 that decodes, for the too-short check downstream). They have no annotation; only the
  ones made from a rendered video (truncated, single_frame) carry captions and prompts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ttm_ray.dataset.rle import encode_frames_objects
from ttm_ray.dataset.sav_format import SavAnnotation, write_sav_annotation

# ----------------------------------------------------------------------------- vocabulary
SHAPES = ("circle", "ellipse", "square", "rectangle", "triangle", "diamond", "hexagon")
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (50, 190, 70), "blue": (50, 90, 230),
    "yellow": (240, 215, 50), "orange": (245, 140, 30), "purple": (140, 60, 200),
    "cyan": (50, 205, 215), "magenta": (225, 60, 185), "white": (240, 240, 240),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (115, 115, 115), "beige": (190, 175, 140), "dark green": (45, 85, 50),
    "navy": (35, 45, 95), "brown": (105, 75, 50),
}
OBJECT_TEXTURES = ("striped", "checkered", "dotted", "speckled")
BACKGROUND_TEXTURES = {"grid": "grid", "mottled": "mottled", "wavy": "wavy-striped"}
# (height, width): even, mostly not multiples of 16, portrait, landscape and square.
FRAME_SIZES = ((190, 250), (180, 320), (144, 176), (320, 240), (150, 210), (128, 128),
               (240, 136), (120, 160))
FPS_CHOICES = (8, 12, 24, 30)
DURATION_RANGE_S = (2.5, 4.0)
CORRUPT_KINDS = ("truncated", "zero_bytes", "text_file", "bad_container", "single_frame")
VIDEO_DIR = "videos"
MANIFEST_NAME = "manifest"
CRF = 18
MAX_LAYOUT_ATTEMPTS = 20
VISIBILITY_SAMPLES = 9  # frames checked by well_visible
MIN_VISIBLE_SHARE = 0.2  # of an object's own area, to count as visible in a sampled frame
MIN_VISIBLE_SAMPLES = 6  # of VISIBILITY_SAMPLES

OBJECT_PROMPT = pa.struct([("name", pa.string()), ("prompt", pa.string())])
MANIFEST_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("path", pa.string()),  # relative to the manifest's folder
    ("caption", pa.string()),
    ("motion_prompt", pa.string()),
    ("object_prompts", pa.list_(OBJECT_PROMPT)),
    ("annotation", pa.string()),  # relative path of the SA-V JSON, null without one
    ("fps", pa.float64()),
    ("num_frames", pa.int64()),
    ("height", pa.int64()),
    ("width", pa.int64()),
    ("num_objects", pa.int64()),
    ("corrupt", pa.bool_()),
    ("corrupt_kind", pa.string()),  # null or one of CORRUPT_KINDS
])


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ObjectSpec:
    """One shape: looks (shape, colour, texture) and a linear trajectory over the video."""

    shape: str
    color_name: str
    texture: str
    radius: float  # size in px at scale 1: circumradius of polygons, minor semi-axis of ellipse
    aspect: float  # width / height for ellipse and rectangle, 1 otherwise
    start: tuple[float, float]  # centre (x, y) at the first frame, px
    end: tuple[float, float]  # centre at the last frame
    angle: float  # radians at the first frame
    spin: float  # radians per frame; > 0 turns clockwise on screen (y points down)
    scale: tuple[float, float]  # size factor at the first and last frame
    period: float  # texture period, px at scale 1
    texture_seed: int

    @property
    def name(self) -> str:
        """The grounding phrase (unique within a video)."""
        return f"{self.color_name} {self.shape}"

    @property
    def color(self) -> tuple[int, int, int]:
        return OBJECT_COLORS[self.color_name]

    def motions(self) -> list[str]:
        """Verb phrases of what this object does ("moves to the right", "shrinks")."""
        out = []
        dx, dy = self.end[0] - self.start[0], self.end[1] - self.start[1]
        if math.hypot(dx, dy) > 0:
            out.append(f"moves {_direction(dx, dy)}")
        if self.spin:
            out.append("rotates " + ("clockwise" if self.spin > 0 else "counterclockwise"))
        if self.scale[1] > self.scale[0]:
            out.append("grows larger")
        elif self.scale[1] < self.scale[0]:
            out.append("shrinks")
        return out


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video; built from the seed by :func:`make_spec`."""

    video_id: str
    height: int
    width: int
    num_frames: int
    fps: int
    background_color: str
    background_texture: str
    background_seed: int
    objects: tuple[ObjectSpec, ...]
    z_order: tuple[int, ...]  # object indices, back to front

    @property
    def caption(self) -> str:
        things = _join([f"{_a(o.color_name)} {o.texture} {o.shape}" for o in self.objects])
        verb = "moves" if len(self.objects) == 1 else "move"
        texture = BACKGROUND_TEXTURES[self.background_texture]
        return (f"{things[0].upper()}{things[1:]} {verb} over a {self.background_color} "
                f"{texture} background.")

    @property
    def motion_prompt(self) -> str:
        """One sentence of motion only: no colours, sizes or background."""
        clauses = [f"the {o.shape} {_join(o.motions())}"
                   for o in self.objects]
        if len(clauses) == 1:
            text = clauses[0]
        elif len(clauses) == 2:
            text = f"{clauses[0]} while {clauses[1]}"
        else:
            text = ", ".join(clauses[:-1]) + f", and {clauses[-1]}"
        return f"{text[0].upper()}{text[1:]}."

    @property
    def object_prompts(self) -> list[dict[str, str]]:
        """Per-object prompts ``{"name", "prompt"}`` in ``masklet_id`` order."""
        return [{"name": o.name,
                 "prompt": f"{_a(o.color_name).capitalize()} {o.texture} {o.shape} "
                           f"{_join(o.motions())}."}
                for o in self.objects]


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an orange", "a red")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def _direction(dx: float, dy: float) -> str:
    """Compass phrase of a screen displacement (y grows downwards), 8 sectors of 45°."""
    names = ("to the right", "up and to the right", "up", "up and to the left", "to the left",
             "down and to the left", "down", "down and to the right")
    sector = round(math.degrees(math.atan2(-dy, dx)) / 45.0) % 8
    return names[sector]


def _trajectory(rng: np.random.Generator, h: int, w: int, margin: float,
                cross: tuple[float, float] | None) -> tuple[tuple[float, float], ...]:
    """Start and end centres inside the frame, far enough apart to read as motion.

    With ``cross`` the path is symmetric about that point, so the object is there at the
    middle frame: put it on another object's midpoint and they are sure to overlap.
    """
    lo = np.array([margin, margin])
    hi = np.array([w - margin, h - margin])
    min_travel = 0.3 * min(h, w)
    for _ in range(50):
        if cross is not None:
            d = rng.uniform(0.18, 0.3) * min(h, w)
            phi = rng.uniform(0, 2 * np.pi)
            offset = d * np.array([np.cos(phi), np.sin(phi)])
            start, end = np.array(cross) + offset, np.array(cross) - offset
        else:
            start, end = rng.uniform(lo, hi), rng.uniform(lo, hi)
        inside = (start >= lo).all() and (start <= hi).all() and (end >= lo).all() \
            and (end <= hi).all()
        if inside and np.linalg.norm(end - start) >= min_travel:
            return tuple(map(float, start)), tuple(map(float, end))
    # Small frames: move across the middle, the longest path that surely fits.
    y = h / 2
    return (float(lo[0]), y), (float(hi[0]), y)


def _path(rng: np.random.Generator, h: int, w: int, margin: float, moves: bool,
          cross: tuple[float, float] | None) -> tuple[tuple[float, float], ...]:
    if moves:
        return _trajectory(rng, h, w, margin, cross)
    centre = tuple(map(float, rng.uniform([margin, margin], [w - margin, h - margin])))
    return centre, centre


def make_spec(seed: int, index: int, num_frames: int | None = None,
              video_id: str | None = None,
              duration_s: tuple[float, float] = DURATION_RANGE_S) -> VideoSpec:
    """The spec of video ``index`` of the corpus of ``seed`` (a pure function of both).

    Random layouts sometimes park one object behind another for most of the video, which
    makes useless ground truth (and a motion prompt about something nobody sees); such a
    draw is replaced by the next one (``[seed, index, attempt]``), see :func:`well_visible`.
    """
    spec = None
    for attempt in range(MAX_LAYOUT_ATTEMPTS):
        rng = np.random.default_rng([seed, index, attempt])
        spec = _sample_spec(rng, num_frames, video_id or f"synth_s{seed}_{index:05d}",
                            duration_s)
        if well_visible(spec):
            break
    assert spec is not None
    return spec


def _sample_spec(rng: np.random.Generator, num_frames: int | None, video_id: str,
                 duration_s: tuple[float, float] = DURATION_RANGE_S) -> VideoSpec:
    h, w = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    fps = int(rng.choice(FPS_CHOICES))
    if num_frames is None:
        num_frames = round(rng.uniform(*duration_s) * fps)
    n_obj = int(rng.integers(1, 5))
    shapes = rng.choice(len(SHAPES), n_obj, replace=False)
    colors = rng.choice(len(OBJECT_COLORS), n_obj, replace=False)
    color_names = list(OBJECT_COLORS)
    min_dim = min(h, w)
    objects: list[ObjectSpec] = []
    for k in range(n_obj):
        shape = SHAPES[shapes[k]]
        aspect = float(rng.uniform(1.4, 1.9)) if shape in ("ellipse", "rectangle") else 1.0
        radius = float(rng.uniform(0.1, 0.16) * min_dim)
        moves, spins, scales = rng.random(3) < (0.8, 0.5, 0.3)
        if not (moves or spins or scales):
            moves = True
        if moves and spins:  # at most two motions each: keeps the motion prompt one sentence
            scales = False
        cross = None
        if moves and objects and rng.random() < 0.6:
            o0 = objects[0]
            cross = ((o0.start[0] + o0.end[0]) / 2, (o0.start[1] + o0.end[1]) / 2)
        start, end = _path(rng, h, w, radius * 0.6, moves, cross)
        turn = float(rng.uniform(np.pi / 3, 1.5 * np.pi)) * float(rng.choice([-1, 1]))
        grow = float(rng.choice([rng.uniform(0.55, 0.75), rng.uniform(1.35, 1.6)]))
        objects.append(ObjectSpec(
            shape=shape,
            color_name=color_names[colors[k]],
            texture=OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))],
            radius=radius,
            aspect=aspect,
            start=start,
            end=end,
            angle=float(rng.uniform(0, 2 * np.pi)),
            spin=turn / max(num_frames - 1, 1) if spins else 0.0,
            scale=(1.0, grow if scales else 1.0),
            period=float(rng.uniform(6, 10)),
            texture_seed=int(rng.integers(2**31)),
        ))
    bg_names = list(BACKGROUND_COLORS)
    return VideoSpec(
        video_id=video_id,
        height=int(h),
        width=int(w),
        num_frames=int(num_frames),
        fps=fps,
        background_color=bg_names[rng.integers(len(bg_names))],
        background_texture=list(BACKGROUND_TEXTURES)[rng.integers(len(BACKGROUND_TEXTURES))],
        background_seed=int(rng.integers(2**31)),
        objects=tuple(objects),
        z_order=tuple(int(i) for i in rng.permutation(n_obj)),
    )


# ----------------------------------------------------------------------------- rendering
def _render_background(spec: VideoSpec) -> np.ndarray:
    """``[H, W, 3]`` uint8 static background: a base colour times a luminance texture."""
    h, w = spec.height, spec.width
    rng = np.random.default_rng(spec.background_seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if spec.background_texture == "grid":
        p = int(rng.integers(12, 20))
        lines = ((xs.astype(int) % p) < 2) | ((ys.astype(int) % p) < 2)
        shade = np.where(lines, 0.65, 1.0)
    elif spec.background_texture == "wavy":
        k = rng.uniform(0.08, 0.15)
        shade = 0.85 + 0.15 * np.sin(k * xs + 6 * np.sin(0.03 * ys))
    else:  # mottled: smooth noise, bilinear upsampling of a coarse random grid
        cell = 16
        gh, gw = h // cell + 2, w // cell + 2
        grid = rng.uniform(0.7, 1.15, (gh, gw)).astype(np.float32)
        gy, gx = ys / cell, xs / cell
        y0, x0 = gy.astype(int), gx.astype(int)
        fy, fx = gy - y0, gx - x0
        shade = (grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1, x0] * fy * (1 - fx)
                 + grid[y0, x0 + 1] * (1 - fy) * fx + grid[y0 + 1, x0 + 1] * fy * fx)
    base = np.array(BACKGROUND_COLORS[spec.background_color], np.float32)
    return np.clip(shade[..., None] * base, 0, 255).astype(np.uint8)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
    """Which local points ``(u, v)`` (object frame, unscaled px) are inside the shape."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "ellipse":
        return (u / (r * aspect)) ** 2 + (v / r) ** 2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.75 * r) & (np.abs(v) <= 0.75 * r)
    if shape == "rectangle":
        return (np.abs(u) <= 0.75 * r * aspect) & (np.abs(v) <= 0.75 * r)
    if shape == "diamond":
        return np.abs(u) / (0.8 * r) + np.abs(v) / r <= 1.0
    sides = {"triangle": 3, "hexagon": 6}[shape]
    # Regular polygon: inside every edge's half-plane (normal angle phi, apothem r cos(pi/n)).
    apothem = r * math.cos(math.pi / sides)
    out = np.ones(u.shape, bool)
    for i in range(sides):
        phi = math.pi / 2 + 2 * math.pi * i / sides
        out &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return out


def _reach(obj: ObjectSpec) -> float:
    """Farthest distance of the shape (at scale 1) from its centre: the bounding radius."""
    r = obj.radius
    return {"ellipse": r * obj.aspect, "square": 0.75 * r * math.sqrt(2),
            "rectangle": 0.75 * r * math.hypot(obj.aspect, 1.0)}.get(obj.shape, r)


def _texture(obj: ObjectSpec, u: np.ndarray, v: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """``[..., 3]`` float colours of the object's surface at local points ``(u, v)``."""
    color = np.array(obj.color, np.float32)
    dark = color * 0.55
    p = obj.period
    if obj.texture == "speckled":  # 2 px cells of a fixed noise tile, following the object
        n = tile.shape[0]
        noise = tile[np.floor(v / 2).astype(int) % n, np.floor(u / 2).astype(int) % n]
        return color + noise[..., None]
    if obj.texture == "striped":
        on = np.floor(u / p).astype(int) % 2 == 0
    elif obj.texture == "checkered":
        on = (np.floor(u / p).astype(int) + np.floor(v / p).astype(int)) % 2 == 0
    else:  # dotted
        du, dv = u % p - p / 2, v % p - p / 2
        on = du * du + dv * dv > (0.3 * p) ** 2
    return np.where(on[..., None], color, dark)


def _pose(obj: ObjectSpec, t: int, num_frames: int) -> tuple[float, float, float, float]:
    a = t / (num_frames - 1) if num_frames > 1 else 0.0
    cx = obj.start[0] + a * (obj.end[0] - obj.start[0])
    cy = obj.start[1] + a * (obj.end[1] - obj.start[1])
    scale = obj.scale[0] + a * (obj.scale[1] - obj.scale[0])
    return cx, cy, obj.angle + obj.spin * t, scale


def _draw(frame: np.ndarray | None, ids: np.ndarray, obj: ObjectSpec, obj_id: int, t: int,
          num_frames: int, tile: np.ndarray | None) -> None:
    """Paint one object into ``frame`` and ``ids`` (in place), inside its bounding box only.

    ``frame=None`` draws the id map only.
    """
    h, w = ids.shape
    cx, cy, theta, scale = _pose(obj, t, num_frames)
    reach = _reach(obj) * scale + 1
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    # Pixel centres -> the object's own frame: undo translation, rotation, then scale.
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    c, s = math.cos(theta), math.sin(theta)
    u = (c * dx + s * dy) / scale
    v = (-s * dx + c * dy) / scale
    inside = _inside(obj.shape, u, v, obj.radius, obj.aspect)
    ids[y0:y1, x0:x1][inside] = obj_id
    if frame is not None and tile is not None:  # texture only the covered pixels
        colours = _texture(obj, u[inside], v[inside], tile)
        frame[y0:y1, x0:x1][inside] = np.clip(colours, 0, 255).astype(np.uint8)


def render_video(spec: VideoSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(frames [T, H, W, 3] uint8 RGB, object_id_map [T, H, W] uint8)``.

    ``object_id_map`` is 0 for background and ``k + 1`` where object ``k`` of
    ``spec.objects`` is the visible (front-most) surface: the ground-truth masks.
    """
    t_n, h, w = spec.num_frames, spec.height, spec.width
    background = _render_background(spec)
    frames = np.repeat(background[None], t_n, axis=0)
    ids = np.zeros((t_n, h, w), np.uint8)
    tiles = [np.random.default_rng(o.texture_seed).uniform(-35, 35, (16, 16)).astype(np.float32)
             for o in spec.objects]
    for t in range(t_n):
        for k in spec.z_order:  # back to front: later objects occlude earlier ones
            _draw(frames[t], ids[t], spec.objects[k], k + 1, t, t_n, tiles[k])
    return frames, ids


def well_visible(spec: VideoSpec) -> bool:
    """Whether every object shows at least ``MIN_VISIBLE_SHARE`` of itself (not hidden by
    objects in front) in at least ``MIN_VISIBLE_SAMPLES`` of ``VISIBILITY_SAMPLES`` evenly
    spaced frames. Cheap: id maps of a few frames only."""
    n, k_n = spec.num_frames, len(spec.objects)
    ok = np.zeros(k_n, int)
    for t in np.unique(np.linspace(0, n - 1, VISIBILITY_SAMPLES).round().astype(int)):
        ids = np.zeros((spec.height, spec.width), np.uint8)
        own = np.zeros(k_n)
        for k in spec.z_order:
            alone = np.zeros_like(ids)
            _draw(None, alone, spec.objects[k], 1, int(t), n, None)
            own[k] = np.count_nonzero(alone)
            _draw(None, ids, spec.objects[k], k + 1, int(t), n, None)
        seen = np.bincount(ids.ravel(), minlength=k_n + 1)[1:]
        ok += (own > 0) & (seen >= MIN_VISIBLE_SHARE * own)
    return bool((ok >= min(MIN_VISIBLE_SAMPLES, n)).all())


# ----------------------------------------------------------------------------- writing
def encode_mp4(frames: np.ndarray, fps: float, path: str | os.PathLike) -> Path:
    """H.264 mp4 of ``[T, H, W, 3]`` uint8 RGB frames, byte-for-byte reproducible.

    Even sizes only (yuv420p). One encoder thread, x264's plain C code (``asm=0``) and the
    bit-exact flags make the output a pure function of the frames: x264 threads would split
    work nondeterministically, the muxer otherwise writes its version string, and x264's SIMD
    macroblock-tree code (lookahead rate control) reads uninitialised stack memory, so with
    asm on the same frames gave different bytes from call to call (valgrind: "use of
    uninitialised value" inside x264_encoder_encode, gone with ``asm=0`` or ``mbtree=0``).
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p H.264 needs even sizes, got {w}x{h}")
    out = Path(path)
    with av.open(str(out), "w", format="mp4",
                 container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1001),
            # asm=0, not mbtree=0: the same rate control and about the same size (mbtree=0
            # made the files ~35% bigger), bytes that do not depend on the CPU's SIMD (AVX2 /
            # AVX-512 paths), at ~2x the encode time of these tiny videos (still well under
            # a second for the quickstart corpus).
            options={"crf": str(CRF), "preset": "veryfast", "threads": "1",
                     "x264-params": "asm=0"},
        )
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out


def write_annotation(spec: VideoSpec, id_map: np.ndarray, path: str | os.PathLike,
                     annotation_stride: int = 1, min_seconds: float | None = None) -> Path:
    """SA-V JSON of the exact visible masks, every ``annotation_stride``-th video frame."""
    k = len(spec.objects)
    sampled = id_map[::annotation_stride]
    masks = sampled[:, None] == np.arange(1, k + 1, dtype=id_map.dtype)[None, :, None, None]
    ann = SavAnnotation(
        video_id=spec.video_id, height=spec.height, width=spec.width,
        num_video_frames=spec.num_frames, fps=float(spec.fps), object_ids=list(range(k)),
        masklet=encode_frames_objects(masks), annotation_stride=annotation_stride,
        environment="Synthetic", split="train",
    )
    return write_sav_annotation(ann, path)


def _write_corrupt(kind: str, path: Path, rng: np.random.Generator,
                   spec: VideoSpec) -> tuple[np.ndarray | None, int]:
    """Write one broken input; returns (rendered frames or None, frames really present)."""
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text_file":
        path.write_text("This is not a video. It is a text file with a video's name.\n" * 8)
    elif kind == "bad_container":
        # An mp4 'ftyp' box, then garbage where the boxes and the stream should be.
        ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41"
        path.write_bytes(ftyp + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind in ("truncated", "single_frame"):
        frames, _ = render_video(spec)
        encode_mp4(frames, spec.fps, path)
        if kind == "single_frame":
            return frames, 1
        data = path.read_bytes()
        # The index (moov) is at the end of the file: cutting it off leaves no playable video.
        path.write_bytes(data[: len(data) * 2 // 5])
        return frames, 0
    else:
        raise ValueError(f"unknown corrupt kind {kind!r} (one of {CORRUPT_KINDS})")
    return None, 0


def _video_row(spec: VideoSpec, path: str, annotation: str | None, corrupt_kind: str | None,
               num_frames: int | None) -> dict:
    described = corrupt_kind in (None, "truncated", "single_frame")
    known = corrupt_kind in (None, "single_frame")
    return {
        "video_id": spec.video_id,
        "path": path,
        "caption": spec.caption if described else None,
        "motion_prompt": spec.motion_prompt if described else None,
        "object_prompts": spec.object_prompts if described else None,
        "annotation": annotation,
        "fps": float(spec.fps) if known else None,
        "num_frames": num_frames if known else None,
        "height": spec.height if known else None,
        "width": spec.width if known else None,
        "num_objects": len(spec.objects) if described else 0,
        "corrupt": corrupt_kind is not None,
        "corrupt_kind": corrupt_kind,
    }


def generate_video(out_dir: str | os.PathLike, seed: int, index: int,
                   annotation_stride: int = 1,
                   duration_s: tuple[float, float] = DURATION_RANGE_S) -> dict:
    """Render, encode and annotate video ``index``; returns its manifest row."""
    spec = make_spec(seed, index, duration_s=duration_s)
    folder = Path(out_dir) / VIDEO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    frames, ids = render_video(spec)
    encode_mp4(frames, spec.fps, folder / f"{spec.video_id}.mp4")
    write_annotation(spec, ids, folder / f"{spec.video_id}_manual.json", annotation_stride)
    return _video_row(spec, f"{VIDEO_DIR}/{spec.video_id}.mp4",
                      f"{VIDEO_DIR}/{spec.video_id}_manual.json", None, spec.num_frames)


def generate_corrupt(out_dir: str | os.PathLike, seed: int, index: int) -> dict:
    """Broken input ``index`` (kind ``CORRUPT_KINDS[index % 5]``); returns its manifest row."""
    kind = CORRUPT_KINDS[index % len(CORRUPT_KINDS)]
    video_id = f"corrupt_s{seed}_{index:03d}_{kind}"
    # Offset the spec index so broken inputs never share a spec with a valid video.
    spec = make_spec(seed, 1_000_000 + index, num_frames=1 if kind == "single_frame" else None,
                     video_id=video_id)
    folder = Path(out_dir) / VIDEO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2_000_000 + index])
    _, present = _write_corrupt(kind, folder / f"{video_id}.mp4", rng, spec)
    return _video_row(spec, f"{VIDEO_DIR}/{video_id}.mp4", None, kind, present)


def write_manifest(rows: list[dict], out_dir: str | os.PathLike) -> Path:
    """``manifest.jsonl`` and ``manifest.parquet`` in ``out_dir``; returns the Parquet path."""
    out = Path(out_dir)
    with open(out / f"{MANIFEST_NAME}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
    path = out / f"{MANIFEST_NAME}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)
    return path


def generate_corpus(out_dir: str | os.PathLike, num_videos: int, seed: int = 0,
                    num_corrupt: int = 0,
                    progress: Callable[[int, int], None] | None = None,
                    annotation_stride: int = 1, min_seconds: float | None = None) -> Path:
    """Write the corpus (see the module doc) and return the path of ``manifest.parquet``.

    ``manifest.jsonl`` beside it holds the same rows. ``progress(done, total)`` is called
    after each file. Deterministic: the same arguments give the same bytes. ``min_seconds``
    makes every valid video at least that long (default 2.5-4 s; the DiT's 121-frame clips
    at 8 fps need 15.1 s).
    """
    if num_videos < 0 or num_corrupt < 0:
        raise ValueError(f"counts must be >= 0, got {num_videos=} {num_corrupt=}")
    if annotation_stride < 1:
        raise ValueError(f"annotation_stride must be >= 1, got {annotation_stride}")
    if min_seconds is not None and min_seconds <= 0:
        raise ValueError(f"min_seconds must be > 0, got {min_seconds}")
    durations = DURATION_RANGE_S if min_seconds is None else (
        max(DURATION_RANGE_S[0], min_seconds),
        max(DURATION_RANGE_S[1], min_seconds + DURATION_RANGE_S[1] - DURATION_RANGE_S[0]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = num_videos + num_corrupt
    rows = []
    for i in range(num_videos):
        rows.append(generate_video(out, seed, i, annotation_stride, durations))
        if progress:
            progress(len(rows), total)
    for i in range(num_corrupt):
        rows.append(generate_corrupt(out, seed, i))
        if progress:
            progress(len(rows), total)
    return write_manifest(rows, out)


def write_benchmark_manifest(corpus_manifest: str | os.PathLike, out_path: str | os.PathLike,
                             limit: int | None = None) -> Path:
    """A generation benchmark from a generated corpus, SA-V-128 style: per valid video an
    item with the video as reference (frame 0 is the input image), its caption, the manual
    motion / object prompts and the GT masks, subset single-/multi-object. JSONL at
    ``out_path`` (paths absolute, so the file works from any directory)."""
    import json

    import pyarrow.parquet as pq

    corpus = Path(corpus_manifest)
    rows = [r for r in pq.read_table(corpus).to_pylist() if not r["corrupt"]]
    rows = rows[:limit] if limit is not None else rows
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = corpus.parent.resolve()
    with out.open("w") as f:
        for r in rows:
            item = {"id": r["video_id"], "prompt": r["caption"],
                    "reference_video": str(base / r["path"]),
                    "subset": "single-object" if r["num_objects"] == 1 else "multi-object",
                    "motion_prompt": r["motion_prompt"],
                    "object_prompts": [{"name": o["name"], "prompt": o["prompt"]}
                                       for o in r["object_prompts"]],
                    "annotation": str(base / r["annotation"])}
            f.write(json.dumps(item) + "\n")
    return out


__all__ = [
    "CORRUPT_KINDS",
    "FRAME_SIZES",
    "MANIFEST_SCHEMA",
    "ObjectSpec",
    "VideoSpec",
    "encode_mp4",
    "generate_corpus",
    "generate_corrupt",
    "generate_video",
    "make_spec",
    "render_video",
    "write_annotation",
    "write_benchmark_manifest",
    "write_manifest",
]
