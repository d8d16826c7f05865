"""Video files for both sides: probe, sample, decode, resize + centre-crop, write.

Data prep and training share this module so a clip row means the same frames everywhere:
``frame_indices`` come from :func:`sample_frame_indices`, pixels from :func:`read_frames`, and
the training resolution from :func:`resize_center_crop` (the paper's rule: resize so the
smaller side matches, then centre-crop). Plain numpy/decord/torch; no Ray.

URIs: local paths and ``file://`` URIs are read in place. Anything else (``s3://``, ``gs://``,
``hdfs://`` through ``pyarrow.fs``; any other fsspec protocol such as ``memory://``) is copied
once into a per-node cache, because decord only takes a path or a file-like object that it
reads *whole into memory* (decord 0.6 ``VideoReader`` does ``bytearray(f.read())``): a file on
disk is cheaper for long videos and serves the probe, the checks and later decodes.
Cache folder: ``$TTM_VIDEO_CACHE`` (default ``<tmp>/ttm_ray_video_cache``), bounded by
``$TTM_VIDEO_CACHE_BYTES`` (default 20 GiB, least recently used evicted first).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

CACHE_ENV = "TTM_VIDEO_CACHE"
CACHE_BYTES_ENV = "TTM_VIDEO_CACHE_BYTES"
_DEFAULT_CACHE_BYTES = 20 << 30
# A cached copy used this recently is never evicted: another worker on the node may be about
# to open it.
_EVICT_GRACE_S = 300.0
_COPY_CHUNK = 8 << 20


class VideoReadError(RuntimeError):
    """A video could not be opened or decoded; the message names the URI."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri, self.reason = uri, reason
        super().__init__(f"{uri}: {reason}")


class InputNotReadable(VideoReadError):
    """The bytes could not be read at all (missing file, permission, I/O error)."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    num_frames: int
    height: int
    width: int


class CropBox(NamedTuple):
    """A region of the source frame in source pixels (what the resized output shows)."""

    top: int
    left: int
    height: int
    width: int


# ----------------------------------------------------------------------------- URIs, files
def _scheme(uri: str) -> str:
    scheme = urlsplit(uri).scheme
    # "C:\\x.mp4" parses with scheme "c": a one-letter scheme is a Windows drive, not a URI.
    return "" if len(scheme) <= 1 else scheme.lower()


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs (read in place, never copied)."""
    return _scheme(str(uri)) in ("", "file")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``file:///a/b.mp4`` -> ``/a/b.mp4``)."""
    uri = str(uri)
    if _scheme(uri) == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri}: file:// URIs with a host are not supported")
        return unquote(parts.path)
    if _scheme(uri):
        raise ValueError(f"{uri}: not a local path")
    return uri


@functools.lru_cache(maxsize=64)
def _pyarrow_root(scheme: str, netloc: str) -> tuple[pafs.FileSystem, str]:
    # from_uri on s3:// and gs:// may resolve the bucket region over the network: once per
    # bucket per process, not once per file.
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or any URI.

    ``pyarrow.fs`` first (native S3/GCS/HDFS); protocols it does not know go through fsspec,
    wrapped so callers always use the one ``pyarrow.fs`` API.
    """
    uri = str(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    parts = urlsplit(uri)
    try:
        fs, root = _pyarrow_root(_scheme(uri), parts.netloc)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a scheme pyarrow does not know
        import fsspec

        fs_spec, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs_spec)), path
    path = root.rstrip("/") + "/" + unquote(parts.path).strip("/")
    return fs, path.rstrip("/") or "/"  # "bucket/prefix", never "bucket/prefix/"


@contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    """A binary read stream over ``uri`` (local or remote). Raises OSError subclasses."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        yield f


def stat(uri: str) -> tuple[int, int | None]:
    """``(size in bytes, mtime in ns or None)``; FileNotFoundError if ``uri`` is no file."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"{uri}: not a file ({info.type.name})")
    return int(info.size), info.mtime_ns


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "ttm_ray_video_cache")


def _evict(cache: Path, keep_bytes: int) -> None:
    entries = []
    now = time.time()
    for e in os.scandir(cache):
        if not e.is_file():
            continue
        st = e.stat()
        if not e.name.endswith(".part"):
            entries.append((st.st_mtime, st.st_size, e.path))
        elif now - st.st_mtime > 12 * _EVICT_GRACE_S:  # left by a worker that died mid-copy
            with contextlib.suppress(OSError):
                os.remove(e.path)
    total = sum(size for _, size, _ in entries)
    for mtime, size, path in sorted(entries):
        if total <= keep_bytes or now - mtime < _EVICT_GRACE_S:
            break
        with contextlib.suppress(OSError):  # another worker may have evicted it first
            os.remove(path)
        total -= size


def local_video_path(uri: str) -> str:
    """A local path for ``uri``: the path itself, or a cached copy of a remote object."""
    if is_local(uri):
        return local_path(uri)
    size, mtime = stat(uri)
    # Size and mtime in the key: a rewritten object gets a new cache entry, not a stale copy.
    key = hashlib.sha256(f"{uri}\0{size}\0{mtime}".encode()).hexdigest()[:32]
    cache = _cache_dir()
    dest = cache / f"{key}{Path(urlsplit(uri).path).suffix[:8]}"
    if dest.is_file() and dest.stat().st_size == size:
        os.utime(dest)  # LRU: mark as used
        return str(dest)
    cache.mkdir(parents=True, exist_ok=True)
    # Unique temp name then an atomic rename: concurrent workers never see a partial file.
    part = cache / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open_input(uri) as src, open(part, "wb") as dst:
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    _evict(cache, int(os.environ.get(CACHE_BYTES_ENV) or _DEFAULT_CACHE_BYTES))
    return str(dest)


# ----------------------------------------------------------------------------- decoding
#: Still images open as one-frame videos (fps 1), so an image flows through every stage and
#: reader that takes a video (two-stage inference starts from one image).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image(uri: str) -> bool:
    return urlsplit(str(uri)).path.lower().endswith(IMAGE_SUFFIXES)


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")), dtype=np.uint8)


class Video:
    """An open video (one decord reader), so a probe and several reads share one open.
    Still images (:data:`IMAGE_SUFFIXES`) open as one-frame videos at 1 fps.

    decord indexes every packet when it opens a file, so a truncated file opens with the
    frames actually present (or fails to open); opening costs one pass over the file.

    decord decodes on a worker thread that runs a few packets ahead of the frames asked for,
    so a damaged packet can fail a read of the frames just *before* it, now and then. A failed
    read is therefore retried once on a fresh reader (the failed one keeps the error state):
    a read fails only when it fails twice, which real damage always does.
    """

    def __init__(self, uri: str, num_threads: int = 1, probe: bool = True) -> None:
        """``probe=False`` skips decoding frame 0 at open (size unknown until :attr:`info` is
        asked for): a reader that wants a few frames deep in a long video decodes only those.
        """
        # num_threads=1: Ray runs one decode task per CPU; decoder threads would oversubscribe.
        self.uri, self._num_threads, self._vr = str(uri), num_threads, None
        self._path: str | None = None
        self._info: VideoInfo | None = None
        try:
            self._path = local_video_path(self.uri)
            if not os.path.isfile(self._path):
                raise FileNotFoundError(f"no such file: {self._path}")
            if not os.access(self._path, os.R_OK):
                raise PermissionError(f"permission denied: {self._path}")
        except (OSError, ValueError, ImportError) as exc:  # ImportError: fsspec lacks the driver
            raise InputNotReadable(self.uri, f"{type(exc).__name__}: {exc}") from exc
        self._still: np.ndarray | None = None
        if is_image(self.uri):
            try:
                self._still = _read_image(self._path)[None]
            except Exception as exc:  # PIL.UnidentifiedImageError, truncated files
                raise VideoReadError(self.uri, f"cannot decode image: {_short(exc)}") from exc
            self._info = VideoInfo(fps=1.0, num_frames=1, height=self._still.shape[1],
                                   width=self._still.shape[2])
            self.num_frames = 1
            return
        try:
            self._vr = self._open()
            num_frames = len(self._vr)
            fps = float(self._vr.get_avg_fps())
        except Exception as exc:  # DECORDError, RuntimeError("Error reading ..."), asserts
            raise VideoReadError(self.uri, f"cannot decode: {_short(exc)}") from exc
        if not math.isfinite(fps) or fps <= 0:
            raise VideoReadError(self.uri, f"no usable frame rate ({fps})")
        self._fps, self.num_frames = fps, int(num_frames)
        if probe:
            self._info = self.info

    @property
    def info(self) -> VideoInfo:
        """fps, frame count and size. decord has no size API: the first call decodes frame 0
        (at open unless ``probe=False``; which also proves something decodes)."""
        if self._info is None:
            first = self._decode([0], "cannot decode the first frame")[0]
            self._info = VideoInfo(fps=self._fps, num_frames=self.num_frames,
                                   height=int(first.shape[0]), width=int(first.shape[1]))
        return self._info

    def _open(self) -> Any:
        import decord

        return decord.VideoReader(self._path, ctx=decord.cpu(0), num_threads=self._num_threads)

    def _decode(self, idx: list[int], what: str) -> np.ndarray:
        if self._still is not None:
            return self._still[idx]
        error: BaseException | None = None
        for _ in range(2):
            try:
                if self._vr is None:
                    self._vr = self._open()
                return _to_numpy(self._vr.get_batch(idx))
            except Exception as exc:
                error, self._vr = exc, None  # never reuse a reader that failed
        raise VideoReadError(self.uri, f"{what}: {_short(error)}") from error

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` as ``[T, H, W, 3]`` uint8 RGB."""
        idx = [int(i) for i in indices]
        if self._path is None:
            raise VideoReadError(self.uri, "video is closed")
        if not idx:
            return np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        bad = [i for i in idx if not 0 <= i < self.num_frames]
        if bad:
            raise VideoReadError(
                self.uri, f"frame index {bad[0]} outside 0..{self.num_frames - 1}")
        return self._decode(idx, "cannot decode frames")

    def close(self) -> None:
        self._vr, self._path, self._still = None, None, None

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _to_numpy(arr: Any) -> np.ndarray:
    # Whatever decord.bridge another module set (native NDArray, torch, ...), return numpy.
    out = arr.asnumpy() if hasattr(arr, "asnumpy") else np.asarray(arr)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _short(exc: BaseException) -> str:
    # decord errors carry a long C++ stack; the last line says what failed.
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def probe_video(uri: str) -> VideoInfo:
    """fps, frame count and size of a video (decodes frame 0). Raises VideoReadError."""
    with Video(uri) as v:
        return v.info


def read_frames(uri: str, indices: Sequence[int], num_threads: int = 1) -> np.ndarray:
    """Frames ``indices`` of ``uri`` as ``[T, H, W, 3]`` uint8 RGB. Raises VideoReadError.

    Decodes only those frames (decord seeks to the keyframe before the first and decodes
    forward; no probe of frame 0), so a clip deep in a long video costs its own span. A
    remote ``uri`` is fetched whole once into the local cache (:func:`local_video_path`);
    embedding clip bytes at publish avoids both the fetch and the seek."""
    with Video(uri, num_threads=num_threads, probe=False) as v:
        return v.read(indices)


def sample_frame_indices(
    src_fps: float, start_frame: int, num_frames: int, target_fps: float | None
) -> list[int]:
    """Source frame index nearest to each of ``num_frames`` timestamps at ``target_fps``.

    Frame ``k`` is at ``start_frame / src_fps + k / target_fps`` seconds; the nearest source
    frame is ``start_frame + round(k * src_fps / target_fps)`` (halves round up, so the result
    does not depend on float banker's rounding). ``target_fps=None`` means the source rate.
    Assumes a constant frame rate (decord's average fps).
    """
    if src_fps <= 0 or (target_fps is not None and target_fps <= 0):
        raise ValueError(f"fps must be positive (src {src_fps}, target {target_fps})")
    step = 1.0 if target_fps is None else src_fps / target_fps
    # The epsilon keeps exact halves (k*step == n + 0.5) from flipping on float error.
    return [int(start_frame) + math.floor(k * step + 0.5 + 1e-9) for k in range(num_frames)]


# ----------------------------------------------------------------------------- geometry
def crop_box(src_h: int, src_w: int, dst_h: int, dst_w: int) -> CropBox:
    """The centred source region that :func:`resize_center_crop` maps onto ``dst_h x dst_w``.

    Scale ``s = max(dst_h / src_h, dst_w / src_w)`` makes both sides cover the target (for a
    square target: the smaller side matches); the kept region is ``dst / s`` source pixels,
    centred (an odd leftover pixel goes to the bottom/right). Later stages use the box to map
    boxes and masks between source and training pixels.
    """
    if min(src_h, src_w, dst_h, dst_w) <= 0:
        raise ValueError(f"sizes must be positive: src {src_h}x{src_w}, dst {dst_h}x{dst_w}")
    scale = max(dst_h / src_h, dst_w / src_w)
    crop_h = min(src_h, max(1, round(dst_h / scale)))
    crop_w = min(src_w, max(1, round(dst_w / scale)))
    return CropBox((src_h - crop_h) // 2, (src_w - crop_w) // 2, crop_h, crop_w)


_RESIZE_CHUNK_ELEMS = 64 << 20  # float32 elements per interpolate call (256 MB)


def resize_center_crop(frames: Any, height: int, width: int) -> Any:
    """Resize so both sides cover ``height x width``, then centre-crop (the paper's rule).

    ``frames``: ``[T, H, W, C]`` or ``[H, W, C]``, a numpy array or a torch tensor (any
    device); returns the same kind, dtype and layout. Implemented as crop-then-resize on the
    :func:`crop_box` region (the same mapping up to sub-pixel rounding of the box, fewer
    pixels to resize, and nothing outside the box bleeds in through the filter) with torch
    ``interpolate(mode="bilinear", antialias=True)``: antialiasing matters because sources are
    often 2-4x larger than 256/512, and torch runs batched on CPU or on the training GPU.
    uint8 input is rounded and clamped back to uint8.
    """
    import torch
    import torch.nn.functional as F

    is_numpy = isinstance(frames, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(frames)) if is_numpy else frames
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected [T, H, W, C] or [H, W, C] frames, got shape {tuple(x.shape)}")
    box = crop_box(int(x.shape[1]), int(x.shape[2]), height, width)
    x = x[:, box.top:box.top + box.height, box.left:box.left + box.width]
    if (box.height, box.width) != (height, width):
        dtype = x.dtype
        t, c = x.shape[0], x.shape[3]
        per_frame = max(1, c * max(box.height * box.width, height * width))
        chunk = max(1, _RESIZE_CHUNK_ELEMS // per_frame)  # bounds memory for long 1080p clips
        parts = []
        for i in range(0, t, chunk):
            y = x[i:i + chunk].permute(0, 3, 1, 2).float()
            y = F.interpolate(y, size=(height, width), mode="bilinear", antialias=True,
                              align_corners=False)
            parts.append(y.permute(0, 2, 3, 1))
        x = torch.cat(parts) if parts else x.new_zeros((0, height, width, c)).float()
        if dtype == torch.uint8:
            x = x.round_().clamp_(0, 255)
        x = x.to(dtype)
    x = x.contiguous()
    if single:
        x = x[0]
    return x.numpy() if is_numpy else x


# ----------------------------------------------------------------------------- writing
def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float, *, codec: str = "libx264",
    pix_fmt: str = "yuv420p", faststart: bool = False, options: dict[str, str] | None = None,
) -> None:
    """Write ``[T, H, W, 3]`` uint8 RGB frames to a local file with PyAV.

    ``yuv420p`` needs even sizes; use ``pix_fmt="yuv444p"`` (or ``codec="mpeg4"``) for odd
    ones. ``faststart`` puts the index first (what streaming services publish).
    """
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.shape} {frames.dtype}")
    rate = Fraction(fps).limit_denominator(1001)
    container = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    try:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


__all__ = [
    "CropBox",
    "InputNotReadable",
    "Video",
    "VideoInfo",
    "VideoReadError",
    "crop_box",
    "filesystem",
    "is_image",
    "is_local",
    "local_path",
    "local_video_path",
    "open_input",
    "probe_video",
    "read_frames",
    "resize_center_crop",
    "sample_frame_indices",
    "stat",
    "write_video",
]
