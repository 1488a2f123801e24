"""Real media files written with PyAV, and a synthetic talking mouth with known A/V sync.

:func:`make_synthetic_clip` draws a face whose mouth opening at frame ``i`` follows the speech
envelope over audio samples ``[i * spf, (i + 1) * spf)`` (``spf = sample_rate // fps``), so the
true offset is zero by construction. A fixed crop centred at ``(0.5 W, 0.75 H)`` with side
``0.35 * min(W, H)`` (``FaceConfig.fixed_mouth``) shows the mouth.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

_VFR_TIME_BASE = Fraction(1, 90000)
# Default audio codec per container when make_synthetic_clip picks one from the suffix.
_AUDIO_CODEC_BY_SUFFIX = {".mp4": "aac", ".m4a": "aac", ".mov": "aac", ".mkv": "pcm_s16le"}


def write_clip(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray] | None,
    audio: np.ndarray | None,
    fps: float,
    sample_rate: int,
    *,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    pix_fmt: str = "yuv420p",
    vfr_times: Sequence[float] | None = None,
    crf: int = 18,
) -> None:
    """Write a real container (mp4, mkv, m4a, wav, ...) with PyAV.

    Video frame ``i`` has pts ``i / fps`` (or ``vfr_times[i]``) and the first audio sample is at
    t=0, so the file's A/V offset is zero.

    Args:
        path: Output file; the suffix picks the container format.
        frames: RGB uint8 frames ``[N, H, W, 3]`` or an iterable of ``[H, W, 3]``; None writes an
            audio-only file.
        audio: Float samples in ``[-1, 1]``, mono ``[S]`` or ``[S, C]``; None writes video only.
        fps: Nominal frame rate.
        sample_rate: Sample rate of ``audio``.
        video_codec: FFmpeg encoder name (``libx264``, ``mpeg4``, ...).
        audio_codec: FFmpeg encoder name (``aac``, ``pcm_s16le``, ...).
        pix_fmt: Pixel format of the encoded video.
        vfr_times: Explicit presentation time in seconds of each frame (variable frame rate);
            must be increasing.
        crf: libx264 quality (lower is closer to lossless).

    Raises:
        ValueError: Nothing to write, or no frames in ``frames``.
    """
    if frames is None and audio is None:
        raise ValueError(f"{path}: nothing to write (no frames and no audio)")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio[:, None] if audio.ndim == 1 else audio
    with av.open(str(path), mode="w") as container:
        vstream = None
        frame_iter: Iterable[np.ndarray] = ()
        if frames is not None:
            it = iter(frames)
            first = next(it, None)
            if first is None:
                raise ValueError(f"{path}: frames is empty")
            frame_iter = itertools.chain([first], it)
            vstream = _add_video_stream(
                container, first.shape, fps, video_codec, pix_fmt, vfr_times is not None, crf
            )
        writer = None
        if audio is not None:
            writer = _AudioWriter(container, audio, sample_rate, audio_codec)
        rate = Fraction(fps).limit_denominator(1001)
        for i, image in enumerate(frame_iter):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image, np.uint8), "rgb24")
            if vfr_times is not None:
                t = Fraction(vfr_times[i])
                frame.pts = round(t / _VFR_TIME_BASE)
                frame.time_base = _VFR_TIME_BASE
            else:
                t = i / rate
                frame.pts = i
                frame.time_base = 1 / rate
            container.mux(vstream.encode(frame))
            if writer is not None:
                # Interleave audio up to this frame's time so the muxer need not buffer.
                writer.write_until(t)
        if vstream is not None:
            container.mux(vstream.encode(None))
        if writer is not None:
            writer.finish()


def _add_video_stream(
    container: Any,
    shape: tuple[int, ...],
    fps: float,
    codec: str,
    pix_fmt: str,
    vfr: bool,
    crf: int,
) -> Any:
    rate = Fraction(fps).limit_denominator(1001)
    stream = container.add_stream(codec, rate=rate)
    stream.height, stream.width = int(shape[0]), int(shape[1])
    stream.pix_fmt = pix_fmt
    stream.codec_context.time_base = _VFR_TIME_BASE if vfr else 1 / rate
    if vfr:
        stream.time_base = _VFR_TIME_BASE
    if codec == "libx264":
        stream.options = {"crf": str(crf)}
    return stream


class _AudioWriter:
    """Encodes ``[S, C]`` float audio in chunks, the first sample at pts 0."""

    def __init__(self, container: Any, audio: np.ndarray, sample_rate: int, codec: str) -> None:
        self.container = container
        self.audio = audio
        self.sample_rate = sample_rate
        channels = audio.shape[1]
        layout = {1: "mono", 2: "stereo"}.get(channels)
        if layout is None:
            raise ValueError(f"write_clip: {channels} audio channels (1 or 2 supported)")
        self.stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        self.is_int = codec.startswith("pcm_s16")
        self.format = "s16" if self.is_int else "flt"
        self.pos = 0

    def write_until(self, t: Fraction) -> None:
        """Encode samples up to time ``t`` seconds."""
        end = min(len(self.audio), int(t * self.sample_rate))
        if end <= self.pos:
            return
        chunk = np.clip(self.audio[self.pos : end], -1.0, 1.0)
        if self.is_int:
            chunk = np.round(chunk * 32767).astype(np.int16)
        # Packed formats take one row of interleaved samples.
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(chunk).reshape(1, -1),
            format=self.format,
            layout=self.stream.layout.name,
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self.pos
        frame.time_base = Fraction(1, self.sample_rate)
        self.container.mux(self.stream.encode(frame))
        self.pos = end

    def finish(self) -> None:
        """Encode the remaining samples and flush the encoder."""
        self.write_until(Fraction(len(self.audio) + 1, self.sample_rate))
        self.container.mux(self.stream.encode(None))


def speech_like_audio(
    seconds: float, sample_rate: int = 16000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like audio: voiced harmonics and noise bursts under a syllable envelope.

    Syllables last 0.12–0.33 s (3–8 Hz) with occasional pauses; each is voiced (harmonics of a
    gliding 90–240 Hz pitch) or, sometimes, a fricative noise burst.

    Args:
        seconds: Length in seconds.
        sample_rate: Samples per second.
        seed: Random seed; the same seed gives the same audio.

    Returns:
        ``(audio, envelope)``: float32 ``[S]`` with peak 0.8, and the amplitude envelope per sample
        in ``[0, 1]``.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    env = np.zeros(n, dtype=np.float64)
    noisy = np.zeros(n, dtype=np.float64)
    pos = int(rng.uniform(0.05, 0.3) * sample_rate)
    while pos < n:
        if rng.random() < 0.15:
            pos += int(rng.uniform(0.15, 0.45) * sample_rate)  # a pause between words
            continue
        length = int(rng.uniform(0.12, 0.33) * sample_rate)
        hump = np.sin(np.linspace(0.0, np.pi, length)) ** 1.5 * rng.uniform(0.45, 1.0)
        end = min(n, pos + length)
        env[pos:end] = np.maximum(env[pos:end], hump[: end - pos])
        if rng.random() < 0.25:
            noisy[pos:end] = 1.0
        pos += int(length * rng.uniform(0.75, 1.1))
    f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    formant = rng.uniform(500, 900)
    voiced = np.zeros(n)
    for k in range(1, 16):
        # Harmonics near the "formant" are louder; k * f0 above Nyquist is skipped per sample.
        gain = 1.0 / k + 0.8 * np.exp(-(((k * f0) - formant) ** 2) / (2 * 200.0**2))
        voiced += np.where(k * f0 < sample_rate / 2, gain * np.sin(k * phase), 0.0)
    voiced /= np.abs(voiced).max() + 1e-9
    noise = rng.standard_normal(n)
    noise /= np.abs(noise).max() + 1e-9
    source = np.where(noisy > 0, 0.6 * noise, voiced + 0.03 * noise)
    audio = source * env
    audio *= 0.8 / (np.abs(audio).max() + 1e-9)
    env /= env.max() + 1e-9
    return audio.astype(np.float32), env.astype(np.float32)


def _draw_mouth(img: np.ndarray, mouth: tuple[int, int], style: dict[str, Any],
                opening: float) -> None:
    """Draw lips around ``mouth`` (centre), opened by ``opening`` in [0, 1]; teeth when wide."""
    h, w = img.shape[:2]
    half_w = int(style["mouth_width"] * w / 2)
    open_h = round(style["max_open"] * h * opening)
    lip = max(1, int(style["lip"] * h))
    cv2.ellipse(img, mouth, (half_w, open_h // 2 + lip), 0, 0, 360, style["lips"], -1, cv2.LINE_AA)
    if open_h >= 1:
        inner = (max(1, half_w - lip), max(1, open_h // 2))
        cv2.ellipse(img, mouth, inner, 0, 0, 360, style["inside"], -1, cv2.LINE_AA)
        # Teeth show at the top of a wide-open mouth.
        if open_h > 4 * lip:
            top = mouth[1] - inner[1]
            cv2.rectangle(
                img,
                (mouth[0] - inner[0] // 2, top),
                (mouth[0] + inner[0] // 2, top + lip),
                (235, 235, 225),
                -1,
            )
    else:
        cv2.line(
            img,
            (mouth[0] - half_w + lip, mouth[1]),
            (mouth[0] + half_w - lip, mouth[1]),
            style["inside"],
            1,
            cv2.LINE_AA,
        )


def _draw_face(
    size: tuple[int, int], style: dict[str, Any], opening: float, jitter: tuple[int, int]
) -> np.ndarray:
    """One RGB frame: background, face, eyes and a mouth opened by ``opening`` in [0, 1]."""
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = style["background"]
    dx, dy = jitter
    cx = w // 2 + dx
    cv2.ellipse(
        img,
        (cx, int(0.55 * h) + dy),
        (int(0.42 * w), int(0.47 * h)),
        0,
        0,
        360,
        style["skin"],
        -1,
        cv2.LINE_AA,
    )
    for ex in (0.35, 0.65):
        centre = (int(ex * w) + dx, int(0.42 * h) + dy)
        cv2.ellipse(
            img,
            centre,
            (int(0.07 * w), int(0.035 * h)),
            0,
            0,
            360,
            (245, 245, 245),
            -1,
            cv2.LINE_AA,
        )
        cv2.circle(img, centre, max(1, int(0.025 * w)), style["iris"], -1, cv2.LINE_AA)
    _draw_mouth(img, (cx, int(0.75 * h) + dy), style, opening)
    return img


def _style(rng: np.random.Generator) -> dict[str, Any]:
    """Per-seed appearance: colours and mouth geometry vary a little."""
    def colour(base: tuple[int, int, int], spread: int) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)

    return {
        "background": colour((70, 90, 150), 40),
        "skin": colour((215, 170, 140), 30),
        "iris": colour((60, 50, 40), 25),
        "lips": colour((170, 70, 80), 25),
        "inside": colour((45, 15, 20), 15),
        "mouth_width": float(rng.uniform(0.18, 0.23)),
        "max_open": float(rng.uniform(0.11, 0.15)),
        "lip": float(rng.uniform(0.012, 0.02)),
    }


def make_synthetic_clip(
    path: str | Path,
    seconds: float = 3.0,
    *,
    fps: int = 25,
    sample_rate: int = 16000,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    video_codec: str = "libx264",
    audio_codec: str | None = None,
) -> dict[str, Any]:
    """Write a synthetic talking-mouth clip whose mouth opening follows the speech envelope.

    Frame ``i``'s opening is the mean envelope over audio samples ``[i * spf, (i + 1) * spf)``,
    ``spf = sample_rate // fps``: the clip is in sync by construction.

    Args:
        path: Output file; ``.mp4`` gets AAC, ``.mkv`` PCM unless ``audio_codec`` is given.
        seconds: Length; the clip has ``round(seconds * fps)`` frames and ``N * spf`` samples.
        fps: Frame rate.
        sample_rate: Audio sample rate (a multiple of ``fps``).
        size: ``(width, height)`` in pixels.
        seed: Random seed for audio, mouth trajectory, appearance and head jitter.
        video_codec: FFmpeg video encoder.
        audio_codec: FFmpeg audio encoder; None picks one from the suffix.

    Returns:
        Metadata: ``path``, ``seed``, ``fps``, ``sample_rate``, ``size``, ``n_frames``,
        ``n_samples`` and ``mouth_open`` (per-frame opening in [0, 1]).
    """
    if sample_rate % fps:
        raise ValueError(f"sample_rate {sample_rate} is not a multiple of fps {fps}")
    path = Path(path)
    spf = sample_rate // fps
    n_frames = round(seconds * fps)
    audio, env = speech_like_audio(n_frames * spf / sample_rate, sample_rate, seed)
    opening = env[: n_frames * spf].reshape(n_frames, spf).mean(axis=1)
    opening = np.clip(opening / (opening.max() + 1e-9), 0.0, 1.0)
    # A separate stream so appearance does not shift when the audio generator changes.
    rng = np.random.default_rng([seed, 1])
    style = _style(rng)
    jitter = np.cumsum(rng.integers(-1, 2, size=(n_frames, 2)), axis=0)
    jitter = np.clip(jitter, -2, 2)
    frames = (
        _draw_face(size, style, float(o), (int(j[0]), int(j[1])))
        for o, j in zip(opening, jitter, strict=True)
    )
    codec = audio_codec or _AUDIO_CODEC_BY_SUFFIX.get(path.suffix.lower(), "aac")
    write_clip(path, frames, audio, fps, sample_rate, video_codec=video_codec, audio_codec=codec)
    return {
        "path": str(path),
        "seed": seed,
        "fps": fps,
        "sample_rate": sample_rate,
        "size": tuple(size),
        "n_frames": n_frames,
        "n_samples": n_frames * spf,
        "mouth_open": [float(o) for o in opening],
    }


def make_synthetic_dataset(
    out_dir: str | Path, n_clips: int, seconds: float = 3.0, seed: int = 0, **kw: Any
) -> list[Path]:
    """Write ``n_clips`` synthetic clips ``syn_00000.mp4``, ... with seeds ``seed + i``.

    Args:
        out_dir: Folder to create and fill.
        n_clips: Number of clips.
        seconds: Length of each clip.
        seed: Seed of the first clip.
        **kw: Passed to :func:`make_synthetic_clip` (``fps``, ``size``, ...); ``suffix``
            (default ``.mp4``) picks the container.

    Returns:
        The clip paths, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = kw.pop("suffix", ".mp4")
    paths = []
    for i in range(n_clips):
        p = out / f"syn_{i:05d}{suffix}"
        make_synthetic_clip(p, seconds, seed=seed + i, **kw)
        paths.append(p)
    return paths
