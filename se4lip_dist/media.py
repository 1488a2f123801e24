"""Decode video and audio in-process with PyAV onto one clock.

Time conventions (every function here uses them):

- ``t = 0`` is the presentation time of the first video frame (the smallest video pts), or of
  the first audio sample in a file without video.
- Output video frame ``i`` represents time ``t_i = i / fps``. It is the source frame *displayed*
  at ``t_i``: the latest source frame whose time is ``<= t_i`` (plus a 1 ms tolerance that
  absorbs time_base rounding, e.g. 33/34 ms steps in Matroska's 1/1000 time base). A source
  frame before which no frame exists (a decoder that dropped leading frames) stands in for the
  times before it. Variable-frame-rate sources therefore resample correctly.
- The number of output frames is ``floor(duration * fps)`` (:func:`count_output_frames`), where
  ``duration`` runs from the first video frame's pts to the end of the last one (its pts plus its
  duration): every output frame's whole ``1 / fps`` interval lies inside the video. A 3.0 s
  25 fps clip gives 75 frames, a 74-frame one 74.
- Output audio sample ``s`` is at ``t = s / sample_rate``. Each decoded audio frame is placed by
  its own pts, so a later or earlier audio start_time becomes leading zeros or a trim. FFmpeg
  already drops AAC encoder priming (the MP4 edit list / skip-samples side data: the first
  decoded AAC frame has pts 0 and starts with the real first sample), and the trailing padding
  is cut at the audio stream's declared duration.

Damaged input: container-level failures (empty, not media, truncated index, missing stream,
unreadable, fewer video packets than the index declares) raise :class:`MediaError` naming the
file. Packets that fail to decode, or frames FFmpeg flags as corrupt, are skipped and logged;
the previous good frame is held for their time (as for a variable-frame-rate gap), skipped
audio is silence. If more than :data:`MAX_BAD_FRACTION` of the video or audio packets are bad,
or nothing decodes, :class:`MediaError` is raised instead of returning garbage.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
import torchaudio.functional as AF

log = logging.getLogger(__name__)

MAX_BAD_FRACTION = 0.05
"""Largest fraction of undecodable video packets tolerated before a clip is rejected."""
_TOLERANCE = Fraction(1, 1000)
"""Slack in seconds when comparing timestamps (time_base rounding)."""


class MediaError(Exception):
    """A media file that cannot be decoded; the message names the file and the problem."""


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` learns about a media file (times in seconds)."""

    path: str
    duration_s: float
    """Video duration (first frame pts to end of last frame); the audio's without video."""
    has_video: bool
    has_audio: bool
    src_fps: float | None
    """Mean source frame rate: frames / duration."""
    vfr: bool
    """True when frame intervals vary by more than 10 % of the median interval."""
    width: int | None
    height: int | None
    src_sample_rate: int | None
    src_channels: int | None
    n_src_frames: int | None = None
    """Video packets (source frames) in the file."""
    start_s: float = 0.0
    """Container time of ``t = 0`` (first video frame's pts, else first audio pts)."""
    audio_start_s: float | None = None
    """Audio stream start on the container clock."""
    audio_end_s: float | None = None
    """End of the audio stream's declared duration on the container clock (None if unknown)."""


@dataclass
class Clip:
    """A whole decoded clip: ``frames[i]`` belongs with ``audio[i * spf:(i + 1) * spf]``."""

    frames: np.ndarray
    """RGB uint8 ``[N, H, W, 3]``."""
    audio: np.ndarray
    """float32 mono ``[N * spf]`` with ``spf = sample_rate // fps``."""
    fps: int
    sample_rate: int
    info: MediaInfo


def _open(path: str | Path) -> Any:
    """Open a container, turning every failure into a MediaError that names the file."""
    name = str(path)
    if not os.path.exists(name):
        raise MediaError(f"{name}: no such file")
    if os.path.isdir(name):
        raise MediaError(f"{name}: is a directory")
    if not os.access(name, os.R_OK):
        raise MediaError(f"{name}: permission denied (not readable)")
    if os.path.getsize(name) == 0:
        raise MediaError(f"{name}: empty file (0 bytes)")
    try:
        return av.open(name, mode="r")
    except PermissionError as e:
        raise MediaError(f"{name}: permission denied (not readable)") from e
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{name}: not a readable media file ({e})") from e


def _seconds(value: int | None, time_base: Fraction | None) -> Fraction | None:
    if value is None or time_base is None:
        return None
    return value * time_base


def probe(path: str | Path) -> MediaInfo:
    """Read stream metadata and scan video packet timestamps (no decoding).

    The scan reads the whole file but decodes nothing, so it is cheap next to decoding and gives
    exact frame counts, durations and variable-frame-rate detection for any container.

    Args:
        path: Media file.

    Returns:
        The file's :class:`MediaInfo`.

    Raises:
        MediaError: The file is missing, unreadable, not media, has no audio or video stream, or
            its packets cannot be read.
    """
    name = str(path)
    with _open(name) as container:
        vstreams = container.streams.video
        astreams = container.streams.audio
        if not vstreams and not astreams:
            what = "no audio or video stream" if container.streams else "no streams"
            raise MediaError(f"{name}: {what} (truncated, or not a media file?)")
        video = _scan_video(container, vstreams[0], name) if vstreams else None
        audio_start = audio_end = None
        sr = channels = None
        if astreams:
            a = astreams[0]
            sr = a.codec_context.sample_rate or a.sample_rate
            channels = a.codec_context.channels
            audio_start = _seconds(a.start_time, a.time_base)
            if audio_start is None:
                audio_start = Fraction(0)
            dur = _seconds(a.duration, a.time_base)
            if dur is not None and dur > 0:
                audio_end = audio_start + dur
            elif container.duration:
                # Containers without per-stream durations (Matroska) still carry a total.
                audio_end = Fraction(container.duration, av.time_base) + Fraction(
                    container.start_time or 0, av.time_base
                )
        if video is not None:
            start, duration, n, vfr, width, height = video
        else:
            start = audio_start or Fraction(0)
            duration = (audio_end - start) if audio_end is not None else Fraction(0)
            n = None
            vfr = False
            width = height = None
        return MediaInfo(
            path=name,
            duration_s=float(duration),
            has_video=video is not None,
            has_audio=bool(astreams),
            src_fps=float(n / duration) if video is not None and duration > 0 else None,
            vfr=vfr,
            width=width,
            height=height,
            src_sample_rate=sr,
            src_channels=channels,
            n_src_frames=n,
            start_s=float(start),
            audio_start_s=float(audio_start) if audio_start is not None else None,
            audio_end_s=float(audio_end) if audio_end is not None else None,
        )


def _scan_video(
    container: Any, stream: Any, name: str
) -> tuple[Fraction, Fraction, int, bool, int, int]:
    """Start, duration, frame count, vfr flag and size from the video packets."""
    tb = stream.time_base
    pts_list: list[int] = []
    end = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's final flush packet
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None:
                raise MediaError(f"{name}: video packet without a timestamp")
            pts_list.append(pts)
            if packet.duration:
                end = max(end or pts, pts + packet.duration)
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: cannot read video packets ({e})") from e
    if not pts_list:
        raise MediaError(f"{name}: video stream has no frames")
    declared = stream.frames or 0  # from the container index (0 where it has none: mkv, ts)
    if len(pts_list) < declared:
        # A cut-off download: the index promises frames whose data is not in the file.
        raise MediaError(f"{name}: truncated file: {len(pts_list)} of the {declared} video "
                         "frames its index declares are present")
    pts_list.sort()
    steps = np.diff(np.asarray(pts_list, dtype=np.int64))
    median = float(np.median(steps)) if len(steps) else None
    last = pts_list[-1]
    if end is None or end <= last:
        # No packet durations: assume the last frame lasts the median interval.
        if median:
            step = median
        elif stream.average_rate:
            step = float(1 / (stream.average_rate * tb))
        else:
            step = 0.0
        end = last + round(step)
    start = pts_list[0]
    vfr = bool(len(steps) and float(steps.max() - steps.min()) > 0.1 * median)
    cc = stream.codec_context
    return start * tb, (end - start) * tb, len(pts_list), vfr, cc.width, cc.height


def count_output_frames(info: MediaInfo, fps: int) -> int:
    """Frames :func:`iter_video_frames` yields at ``fps``: ``floor(duration_s * fps)``.

    Args:
        info: From :func:`probe`.
        fps: Output frame rate.

    Returns:
        The number of output frames (0 for a file without video).
    """
    if not info.has_video:
        return 0
    # The epsilon keeps 3.0 s * 25 at 75 despite float rounding.
    return math.floor(info.duration_s * fps + 1e-6)


def iter_video_frames(
    path: str | Path, fps: int = 25, *, info: MediaInfo | None = None, threads: int = 0
) -> Iterator[np.ndarray]:
    """Yield RGB uint8 ``[H, W, 3]`` frames resampled to a constant ``fps`` by timestamp.

    The RGB pixels of :func:`iter_pictures` (same arguments, frames and errors).
    """
    for picture in iter_pictures(path, fps, info=info, threads=threads):
        yield picture.rgb()


def iter_pictures(
    path: str | Path, fps: int = 25, *, info: MediaInfo | None = None, threads: int = 0
) -> Iterator[Picture]:
    """Yield one :class:`Picture` per output time ``i / fps``, resampled by timestamp.

    Holds O(1) decoded frames; a source frame shown at several output times is the same
    Picture each time. See the module docstring for which source frame is picked and how many
    are yielded (exactly :func:`count_output_frames`).

    Args:
        path: Media file with a video stream.
        fps: Output frame rate.
        info: :func:`probe` result, if the caller already has it.
        threads: decoder threads; 0 lets FFmpeg choose (fastest wall time for one clip), 1
            decodes in the calling thread (least CPU per frame: for one clip per core).

    Raises:
        MediaError: No video stream, or the video cannot be decoded (see module docstring).
    """
    name = str(path)
    info = info or probe(name)
    if not info.has_video:
        raise MediaError(f"{name}: no video stream")
    n_out = count_output_frames(info, fps)
    start = Fraction(info.start_s).limit_denominator(10**7)
    held: Any = None  # latest av.VideoFrame at or before the next output time
    held_picture: Picture | None = None
    i = 0
    bad = 0
    with _open(name) as container:
        stream = container.streams.video[0]
        if threads == 1:
            stream.codec_context.thread_count = 1
        else:
            stream.codec_context.thread_type = "AUTO"
            if threads > 1:
                stream.codec_context.thread_count = threads
        for frame in _decode_frames(container, stream, name):
            if frame is None:
                bad += 1
                continue
            t = frame.pts * frame.time_base - start if frame.pts is not None else None
            if t is None:
                raise MediaError(f"{name}: decoded video frame without a timestamp")
            if held is None:
                held = frame  # stands in for any times before it (decoder dropped leaders)
            # Every output time before this frame shows the held (latest earlier) frame.
            while i < n_out and Fraction(i, fps) + _TOLERANCE < t:
                if held_picture is None:
                    held_picture = Picture(held)
                yield held_picture
                i += 1
            if frame is not held:
                held, held_picture = frame, None
            if i >= n_out:
                break
        _check_bad(name, bad, info.n_src_frames)
        if held is None:
            raise MediaError(f"{name}: no video frame could be decoded")
        while i < n_out:
            if held_picture is None:
                held_picture = Picture(held)
            yield held_picture
            i += 1


# FFmpeg's AVColorSpace codes for BT.601 or unknown (swscale's default is BT.601 too) and its
# unknown/limited range codes: what OpenCV's I420 conversion assumes.
_BT601_SPACES = {2, 5, 6}
_LIMITED_RANGE = {0, 1}


def _opencv_i420(frame: Any) -> bool:
    """True for limited-range BT.601 ``yuv420p`` (H.264/MPEG SD video): OpenCV's I420 case."""
    return (frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
            and frame.colorspace in _BT601_SPACES and frame.color_range in _LIMITED_RANGE)


def to_rgb(frame: Any) -> np.ndarray:
    """An ``av.VideoFrame`` as RGB uint8 ``[H, W, 3]``.

    Limited-range BT.601 ``yuv420p`` frames go through OpenCV's I420 conversion, several times
    cheaper than swscale's and within a few levels of it (rounding and chroma siting); every
    other format goes through swscale.
    """
    if _opencv_i420(frame):
        i420 = frame.to_ndarray()
        if i420.shape == (frame.height * 3 // 2, frame.width):
            return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


class Picture:
    """One decoded video frame whose RGB pixels are computed only when asked for (once).

    :meth:`warp` crops without converting the whole frame where it can: a mouth crop then
    costs a crop-sized colour conversion. ``np.asarray(picture)`` is :meth:`rgb`.
    """

    __slots__ = ("_frame", "_rgb", "height", "width")

    def __init__(self, frame: Any) -> None:
        """Args:
        frame: an ``av.VideoFrame`` (kept, with its buffers, until the Picture is dropped).
        """
        self._frame = frame
        self._rgb: np.ndarray | None = None
        self.height = int(frame.height)
        self.width = int(frame.width)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, 3)``, as the RGB array's."""
        return self.height, self.width, 3

    def rgb(self) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` (:func:`to_rgb`), converted on first use."""
        if self._rgb is None:
            self._rgb = to_rgb(self._frame)
        return self._rgb

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        rgb = self.rgb()
        return rgb if dtype is None else rgb.astype(dtype)

    def warp(self, m: np.ndarray, size: int) -> np.ndarray:
        """``cv2.warpAffine(self.rgb(), m, (size, size))`` (bilinear, ``m`` maps output pixels
        to input coordinates, border replicated), converting only the region it samples.

        Where :func:`to_rgb` takes OpenCV's I420 path, only the even-aligned bounding box of the
        sampled input pixels is converted: the same RGB values there, so the same crop (to
        within warp rounding) for a fraction of a whole frame's conversion.

        Args:
            m: 2x3 map from output pixel ``(u, v)`` to input pixel coordinates.
            size: output side in pixels.

        Returns:
            RGB uint8 ``[size, size, 3]``.
        """
        box = None if self._rgb is not None else self._sampled_box(m, size)
        if box is None:
            return warp(self.rgb(), m, size)
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        planes = self._frame.planes
        n = w * h
        i420 = np.empty(n * 3 // 2, np.uint8)
        i420[:n].reshape(h, w)[:] = _plane(planes[0], self.height, self.width)[y0:y1, x0:x1]
        half = (slice(y0 // 2, y1 // 2), slice(x0 // 2, x1 // 2))
        i420[n : n + n // 4].reshape(h // 2, w // 2)[:] = _plane(
            planes[1], self.height // 2, self.width // 2)[half]
        i420[n + n // 4 :].reshape(h // 2, w // 2)[:] = _plane(
            planes[2], self.height // 2, self.width // 2)[half]
        region = cv2.cvtColor(i420.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_I420)
        shifted = np.array(m, dtype=np.float64)
        shifted[:, 2] -= (x0, y0)
        return warp(region, shifted, size)

    def _sampled_box(self, m: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
        """Even-aligned ``(x0, y0, x1, y1)`` inside the frame holding every pixel a bilinear
        warp reads (outside it, only replicated border pixels), or None: convert it all."""
        if not _opencv_i420(self._frame):
            return None
        corners = np.asarray(m, np.float64) @ np.array(
            [[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]],
            np.float64).T
        lo = np.floor(corners.min(axis=1)) - 1
        hi = np.ceil(corners.max(axis=1)) + 2
        x0 = int(np.clip(lo[0], 0, self.width)) // 2 * 2
        y0 = int(np.clip(lo[1], 0, self.height)) // 2 * 2
        x1 = min(self.width, -(-int(np.clip(hi[0], 0, self.width)) // 2) * 2)
        y1 = min(self.height, -(-int(np.clip(hi[1], 0, self.height)) // 2) * 2)
        if x1 - x0 < 2 or y1 - y0 < 2 or 2 * (x1 - x0) * (y1 - y0) > self.width * self.height:
            return None
        return x0, y0, x1, y1


def _plane(plane: Any, height: int, width: int) -> np.ndarray:
    """A frame plane as a ``[height, width]`` uint8 view of its buffer (no copy)."""
    rows = np.frombuffer(plane, np.uint8)
    return rows[: height * plane.line_size].reshape(height, plane.line_size)[:, :width]


def warp(frame: np.ndarray | Picture, m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear ``size`` x ``size`` resampling of a frame, border replicated.

    Args:
        frame: an RGB (or single-channel) uint8 array, or a :class:`Picture` (cropped from its
            planes where it can be, see :meth:`Picture.warp`).
        m: 2x3 map from output pixel ``(u, v)`` to input pixel coordinates.
        size: output side in pixels.
    """
    if isinstance(frame, Picture):
        return frame.warp(m, size)
    return cv2.warpAffine(np.ascontiguousarray(frame), m, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _check_bad(name: str, bad: int, total: int | None) -> None:
    if bad == 0:
        return
    if total and bad > MAX_BAD_FRACTION * total:
        raise MediaError(f"{name}: {bad} of {total} video packets are corrupt")
    log.warning("%s: skipped %d corrupt video packet(s); held the previous frame", name, bad)


def _decode_frames(container: Any, stream: Any, name: str) -> Iterator[Any]:
    """Decoded frames in presentation order; None marks a packet that failed to decode."""
    try:
        packets = container.demux(stream)
        for packet in packets:
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                yield None
                continue
            for frame in frames:
                yield None if frame.is_corrupt else frame
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: cannot read video ({e})") from e


def decode_audio(
    path: str | Path,
    sample_rate: int = 16000,
    *,
    n_samples: int | None = None,
    info: MediaInfo | None = None,
) -> np.ndarray:
    """Decode audio to float32 mono at ``sample_rate`` on the video's clock.

    Channels are averaged; resampling uses ``torchaudio.functional.resample``. Sample ``s`` is at
    ``t = s / sample_rate`` with ``t = 0`` at the first video frame (see module docstring).

    Args:
        path: Media file with an audio stream.
        sample_rate: Output sample rate.
        n_samples: Zero-pad or trim the result to exactly this length (``N * spf`` for N frames).
        info: :func:`probe` result, if the caller already has it.

    Returns:
        float32 ``[S]``; without ``n_samples``, S covers t=0 to the audio stream's end.

    Raises:
        MediaError: No audio stream, or the audio cannot be decoded.
    """
    name = str(path)
    info = info or probe(name)
    if not info.has_audio:
        raise MediaError(f"{name}: no audio stream")
    start = Fraction(info.start_s).limit_denominator(10**7)
    chunks, expected, src_sr, packets, bad = _audio_chunks(name, start, info.src_sample_rate)
    if not chunks or not src_sr:
        raise MediaError(f"{name}: no audio could be decoded")
    if bad > MAX_BAD_FRACTION * packets:
        # Skipped packets become silence: past a few, the audio no longer matches the lips.
        raise MediaError(f"{name}: {bad} of {packets} audio packets are corrupt")
    if bad:
        log.warning("%s: skipped %d undecodable audio packet(s) (silence there)", name, bad)

    end = expected or 0
    if info.audio_end_s is not None:
        # Cuts AAC trailing padding: the stream's declared end, not the last decoded frame's.
        declared = round((Fraction(info.audio_end_s) - start) * src_sr)
        end = min(end, declared) if declared > 0 else end
    out = _place(chunks, end)
    if src_sr != sample_rate:
        out = _resample(out, src_sr, sample_rate)
    if n_samples is not None:
        out = _fit(out, n_samples)
    return out


def _audio_chunks(name: str, start: Fraction, src_sr: int | None
                  ) -> tuple[list[tuple[int, np.ndarray]], int | None, int | None, int, int]:
    """Decode every audio packet: ``(chunks, end, sample rate, packets, corrupt packets)``,
    each chunk ``(source-rate offset from t=0, mono samples)`` placed by its pts where that
    disagrees with the running position by more than the tolerance."""
    chunks: list[tuple[int, np.ndarray]] = []  # (source-rate offset from t=0, mono samples)
    expected: int | None = None
    packets = bad = 0
    try:
        with _open(name) as container:
            stream = container.streams.audio[0]
            stream.codec_context.thread_type = "AUTO"
            for packet in container.demux(stream):
                packets += packet.size > 0
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1
                    continue
                for frame in frames:
                    src_sr = frame.sample_rate
                    mono = _to_mono(frame)
                    pos = expected
                    if frame.pts is not None:
                        at = round((frame.pts * frame.time_base - start) * src_sr)
                        # Trust the pts only when it disagrees by more than the tolerance:
                        # coarse time bases (1/1000) would otherwise jitter the stream.
                        if expected is None or abs(at - expected) > _TOLERANCE * src_sr:
                            pos = at
                    if pos is None:
                        pos = 0
                    chunks.append((pos, mono))
                    expected = pos + len(mono)
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: cannot decode audio ({e})") from e
    return chunks, expected, src_sr, packets, bad


def _place(chunks: list[tuple[int, np.ndarray]], end: int) -> np.ndarray:
    """The chunks written into ``end`` samples of silence (overlaps: the later chunk wins)."""
    out = np.zeros(max(end, 0), dtype=np.float32)
    for pos, mono in chunks:
        lo, hi = max(pos, 0), min(pos + len(mono), len(out))
        if hi > lo:
            out[lo:hi] = mono[lo - pos : hi - pos]
    return out


def _to_mono(frame: Any) -> np.ndarray:
    """Average the channels of a decoded audio frame, scaled to float [-1, 1]."""
    array = frame.to_ndarray()
    # Planar formats are [channels, samples]; packed ones one row of interleaved samples.
    channels = len(frame.layout.channels)
    data = array if frame.format.is_planar else array.reshape(-1, channels).T
    if data.dtype == np.int16:
        data = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        data = data.astype(np.float32) / 2147483648.0
    elif data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128.0) / 128.0
    return data.astype(np.float32).mean(axis=0)


def _resample(audio: np.ndarray, src: int, dst: int) -> np.ndarray:
    n_out = math.ceil(len(audio) * dst / src)
    out = AF.resample(torch.from_numpy(audio), src, dst).numpy()
    return _fit(out.astype(np.float32, copy=False), n_out)


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    if len(audio) >= n:
        return np.ascontiguousarray(audio[:n])
    return np.concatenate([audio, np.zeros(n - len(audio), dtype=np.float32)])


def decode_clip(path: str | Path, fps: int = 25, sample_rate: int = 16000) -> Clip:
    """Decode a whole (short) clip into memory: frames and exactly ``N * spf`` audio samples.

    Args:
        path: Media file with video and audio.
        fps: Output frame rate.
        sample_rate: Output sample rate; must be a multiple of ``fps``.

    Returns:
        The decoded :class:`Clip`.

    Raises:
        MediaError: A stream is missing or cannot be decoded.
    """
    name = str(path)
    info = probe(name)
    if not info.has_video:
        raise MediaError(f"{name}: no video stream")
    if not info.has_audio:
        raise MediaError(f"{name}: no audio stream")
    if sample_rate % fps:
        raise ValueError(f"sample_rate {sample_rate} is not a multiple of fps {fps}")
    frames = list(iter_video_frames(name, fps, info=info))
    if not frames:
        raise MediaError(f"{name}: video shorter than one frame at {fps} fps")
    spf = sample_rate // fps
    audio = decode_audio(name, sample_rate, n_samples=len(frames) * spf, info=info)
    return Clip(np.stack(frames), audio, fps, sample_rate, info)


__all__ = [
    "MAX_BAD_FRACTION",
    "Clip",
    "MediaError",
    "MediaInfo",
    "Picture",
    "count_output_frames",
    "decode_audio",
    "decode_clip",
    "iter_pictures",
    "iter_video_frames",
    "probe",
    "to_rgb",
    "warp",
]
