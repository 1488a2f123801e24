"""Decoding: exact A/V offset across containers and rates, VFR resampling, frame counts, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from se4lip_dist.media import (
    MediaError,
    count_output_frames,
    decode_audio,
    decode_clip,
    iter_video_frames,
    probe,
)
from se4lip_dist.synthetic import write_clip

SHARED = Path(
    os.environ.get("SE4LIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
FPS, SPF = 25, 640
FLASH = 30  # output frame (at 25 fps) that shows the flash and whose audio window holds the beep


def _flash_beep_clip(path: Path, src_fps: int, sample_rate: int, channels: int, codec: str) -> None:
    """Black frames with a white flash at t = FLASH / 25 s and a 20 ms 1 kHz beep starting then."""
    t_flash = FLASH / FPS
    n = round(3.0 * src_fps)
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    frames[round(t_flash * src_fps)] = 255
    audio = np.zeros(round(3.0 * sample_rate), np.float32)
    start = round(t_flash * sample_rate)
    k = np.arange(round(0.02 * sample_rate))
    audio[start : start + len(k)] = 0.5 * np.sin(2 * np.pi * 1000 * k / sample_rate)
    if channels == 2:
        audio = np.stack([audio, 0.5 * audio], axis=1)
    write_clip(path, frames, audio, src_fps, sample_rate, audio_codec=codec)


@pytest.mark.parametrize(
    ("name", "src_fps", "sample_rate", "channels", "codec"),
    [
        ("h264_aac16k.mp4", 25, 16000, 1, "aac"),
        ("h264_pcm44k_stereo.mkv", 25, 44100, 2, "pcm_s16le"),
        ("h264_aac_30fps.mp4", 30, 16000, 1, "aac"),
    ],
)
def test_av_offset_is_exact(tmp_path, name, src_fps, sample_rate, channels, codec):
    path = tmp_path / name
    _flash_beep_clip(path, src_fps, sample_rate, channels, codec)
    clip = decode_clip(path, FPS, 16000)
    assert clip.frames.shape == (75, 64, 64, 3)
    assert clip.audio.shape == (75 * SPF,) and clip.audio.dtype == np.float32
    brightness = clip.frames.reshape(75, -1).mean(axis=1)
    assert np.flatnonzero(brightness > 128).tolist() == [FLASH]
    # Onset = first sample above 30 % of the peak (resampling/AAC ringing stays far below that).
    # It must fall inside the flash frame's own audio window, no looser.
    level = np.abs(clip.audio)
    onset = int(np.flatnonzero(level > 0.3 * level.max())[0])
    assert FLASH * SPF <= onset < (FLASH + 1) * SPF
    assert onset - FLASH * SPF < 16  # within 1 ms of the true onset
    assert level[: FLASH * SPF - 64].max() < 0.02  # nothing leaked before the beep


def _index_frame(j: int) -> np.ndarray:
    """A frame whose 8 vertical stripes spell ``j`` in binary (robust to lossy coding)."""
    bits = (j >> np.arange(8)) & 1
    return (
        np.repeat(np.repeat(bits * 255, 8)[None, :, None], 32, axis=0).repeat(3, 2).astype(np.uint8)
    )


def _read_index(frame: np.ndarray) -> int:
    stripes = frame.mean(axis=(0, 2)).reshape(8, 8).mean(axis=1) > 128
    return int(np.sum(stripes << np.arange(8)))


def test_vfr_resampling_picks_displayed_frame(tmp_path):
    times = [0.0, 0.03, 0.1, 0.12, 0.2, 0.33, 0.4, 0.41, 0.5, 0.6]
    frames = np.stack([_index_frame(j) for j in range(len(times))])
    path = tmp_path / "vfr.mp4"
    write_clip(path, frames, None, 25, 16000, vfr_times=times)
    info = probe(path)
    assert info.vfr and info.n_src_frames == len(times)
    out = list(iter_video_frames(path, 25))
    # Last frame lasts 0.04 s (muxer's guess), so the video spans 0.64 s -> 16 output frames.
    assert len(out) == count_output_frames(info, 25) == 16
    got = [_read_index(f) for f in out]
    expected = [max(j for j, t in enumerate(times) if t <= i / 25 + 1e-9) for i in range(16)]
    assert got == expected


def test_30fps_to_25fps_counts_and_picks(tmp_path):
    frames = np.stack([_index_frame(j) for j in range(90)])
    path = tmp_path / "cfr30.mp4"
    write_clip(path, frames, None, 30, 16000)
    out = list(iter_video_frames(path, 25))
    assert len(out) == 75
    got = [_read_index(f) for f in out]
    assert got == [i * 30 // 25 for i in range(75)]


def test_frame_count_and_audio_length(tmp_path):
    path = tmp_path / "c.mp4"
    write_clip(path, np.zeros((75, 32, 32, 3), np.uint8), np.zeros(48000, np.float32), 25, 16000)
    info = probe(path)
    assert info.duration_s == pytest.approx(3.0) and count_output_frames(info, 25) == 75
    assert info.src_fps == pytest.approx(25.0) and not info.vfr
    assert decode_audio(path, 16000, n_samples=48000).shape == (48000,)
    assert decode_audio(path, 16000, n_samples=47000).shape == (47000,)
    assert decode_audio(path, 16000, n_samples=50000)[48000:].max() == 0
    # Without n_samples the AAC trailing padding is cut at the stream's declared end.
    assert decode_audio(path, 16000).shape == (48000,)
    assert decode_audio(path, 8000).shape == (24000,)


def test_audio_start_later_than_video_is_zero_padded(tmp_path):
    # A video that starts 0.2 s after the audio moves t=0 to the first video frame.
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    times = [0.2 + i / 25 for i in range(10)]
    audio = np.zeros(16000, np.float32)
    audio[int(0.24 * 16000)] = 0.9  # a click at 0.24 s on the file clock = 0.04 s on t
    path = tmp_path / "late_video.mkv"
    write_clip(path, frames, audio, 25, 16000, audio_codec="pcm_s16le", vfr_times=times)
    info = probe(path)
    assert info.start_s == pytest.approx(0.2)
    out = decode_audio(path, 16000, n_samples=400 * 16)
    assert int(np.argmax(np.abs(out))) == 640


def _write_ok(path: Path) -> None:
    write_clip(path, np.zeros((25, 32, 32, 3), np.uint8), np.zeros(16000, np.float32), 25, 16000)


def _expect_media_error(path: Path, match: str, fn=decode_clip) -> None:
    with pytest.raises(MediaError, match=match) as err:
        fn(path)
    assert str(path) in str(err.value)


def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _expect_media_error(empty, "empty")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    _expect_media_error(text, "not a readable media file")
    _expect_media_error(tmp_path / "missing.mp4", "no such file")

    good = tmp_path / "good.mp4"
    _write_ok(good)
    cut = tmp_path / "truncated.mp4"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _expect_media_error(cut, "not a readable media file|cannot")

    silent = tmp_path / "video_only.mp4"
    write_clip(silent, np.zeros((25, 32, 32, 3), np.uint8), None, 25, 16000)
    _expect_media_error(silent, "no audio stream")
    _expect_media_error(silent, "no audio stream", decode_audio)

    for name, codec in [("voice.m4a", "aac"), ("voice.wav", "pcm_s16le")]:
        audio_only = tmp_path / name
        write_clip(audio_only, None, np.zeros(16000, np.float32), 25, 16000, audio_codec=codec)
        _expect_media_error(audio_only, "no video stream")
        _expect_media_error(audio_only, "no video stream", lambda p: list(iter_video_frames(p)))
        assert decode_audio(audio_only).shape == (16000,)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read mode-000 files")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.mp4"
    _write_ok(path)
    path.chmod(0)
    try:
        _expect_media_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_corrupt_packets_hold_previous_frame_or_fail(tmp_path):
    good = tmp_path / "good.mkv"
    frames = np.stack([np.full((32, 32, 3), 3 * j, np.uint8) for j in range(75)])
    write_clip(good, frames, None, 25, 16000, video_codec="mpeg4")
    data = bytearray(good.read_bytes())
    # Overwrite the middle third with junk: many packets become undecodable.
    third = len(data) // 3
    data[third : 2 * third] = os.urandom(third)
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    try:
        out = list(iter_video_frames(bad, 25))
    except MediaError as e:
        assert str(bad) in str(e)
    else:
        # If anything came back it is the full count of real (held) frames, never garbage sizes.
        assert all(f.shape == (32, 32, 3) for f in out)


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "grid_s1").is_dir(), reason=f"no shared data at {SHARED}")
def test_grid_clip():
    path = sorted((SHARED / "grid_s1" / "video").glob("*.mp4"))[0]
    clip = decode_clip(path)
    n = len(clip.frames)
    assert n in (74, 75) and n == clip.info.n_src_frames
    assert clip.frames.shape[1:] == (288, 360, 3)
    assert clip.audio.shape == (n * SPF,)


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "wild").is_dir(), reason=f"no shared data at {SHARED}")
def test_wild_vfr_30fps_clip():
    path = SHARED / "wild" / "retalking_1_30fps.mp4"
    info = probe(path)
    assert info.vfr and info.src_sample_rate == 44100
    n = int(info.duration_s * 25 + 1e-6)
    frames = sum(1 for _ in iter_video_frames(path, 25, info=info))
    assert frames == n == count_output_frames(info, 25)
    audio = decode_audio(path, 16000, n_samples=n * SPF, info=info)
    assert audio.shape == (n * SPF,) and np.abs(audio).max() > 0.01


def _grid_or_synthetic(tmp_path: Path) -> Path:
    grid = sorted((SHARED / "grid_s1" / "video").glob("*.mp4"))[:1]
    if grid:
        return grid[0]
    from se4lip_dist.synthetic import make_synthetic_clip

    make_synthetic_clip(tmp_path / "c.mp4", 2.0, seed=1, size=(96, 80))
    return tmp_path / "c.mp4"


def test_fast_rgb_conversion_matches_swscale(tmp_path):
    import av

    from se4lip_dist.media import to_rgb

    path = _grid_or_synthetic(tmp_path)
    with av.open(str(path)) as c:
        frames = [f for _, f in zip(range(10), c.decode(video=0), strict=False)]
    assert frames[0].format.name == "yuv420p"
    for f in frames:
        ref = f.to_ndarray(format="rgb24")
        got = to_rgb(f)
        assert got.shape == ref.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - ref)
        # Same BT.601 limited-range matrix: only rounding and chroma siting differ.
        assert diff.max() <= 4 and diff.mean() < 1.5
    # Other formats go through swscale unchanged.
    rgb = frames[0].reformat(format="rgb24")
    assert np.array_equal(to_rgb(rgb), rgb.to_ndarray())
    full = frames[0].reformat(format="yuvj420p")
    assert np.array_equal(to_rgb(full), full.to_ndarray(format="rgb24"))


def test_one_decoder_thread_gives_the_same_frames(tmp_path):
    path = _grid_or_synthetic(tmp_path)
    auto = list(iter_video_frames(path, 25))
    one = list(iter_video_frames(path, 25, threads=1))
    two = list(iter_video_frames(path, 25, threads=2))
    assert len(auto) == len(one) == len(two) > 0
    assert all(np.array_equal(a, b) and np.array_equal(a, c)
               for a, b, c in zip(auto, one, two, strict=True))


def _crops() -> list[tuple[float, float, float, int, bool]]:
    """(cx, cy, side, out, from the planes) mouth squares on an 80-pixel frame: inside,
    sub-pixel, past every edge, odd sizes; most of the frame or none of it is converted whole."""
    return [(40.0, 40.0, 30.0, 24, True), (41.3, 37.7, 33.5, 25, True),
            (3.0, 2.0, 20.0, 16, True), (90.0, 75.0, 26.0, 21, True),
            (48.0, 40.0, 70.0, 32, False), (-30.0, 40.0, 20.0, 16, False)]


def test_picture_crops_from_its_planes_like_the_converted_frame(tmp_path):
    from se4lip_dist.faces import crop_square
    from se4lip_dist.media import iter_pictures

    path = _grid_or_synthetic(tmp_path)
    for pic in list(iter_pictures(path, 25))[:5]:
        scale = min(pic.height, pic.width) / 80  # the crops above, on any frame size
        for cx, cy, side, out, planes in _crops():
            got = crop_square(pic, cx * scale, cy * scale, side * scale, out)
            assert (pic._rgb is None) == planes, (cx, cy, side, out)
            ref = crop_square(pic.rgb().copy(), cx * scale, cy * scale, side * scale, out)
            pic._rgb = None
            assert got.shape == ref.shape == (out, out, 3) and got.dtype == np.uint8
            assert np.abs(got.astype(int) - ref).max() <= 1, (cx, cy, side, out)


def test_picture_of_other_formats_converts_the_frame():
    import av

    from se4lip_dist.faces import crop_square
    from se4lip_dist.media import Picture

    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    for frame in (av.VideoFrame.from_ndarray(rgb, format="rgb24"),
                  av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")):
        pic = Picture(frame)
        assert pic.shape == (48, 64, 3)
        ref = crop_square(pic.rgb().copy(), 30.5, 20.0, 25.0, 20)
        pic._rgb = None
        assert np.array_equal(crop_square(pic, 30.5, 20.0, 25.0, 20), ref)
        assert np.array_equal(np.asarray(pic), pic.rgb())
