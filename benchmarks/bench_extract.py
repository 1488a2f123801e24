"""Feature extraction: real-time factor of ``extract``'s encoder path vs HuBERT-large.

Encoder path: ``extract.extract_features`` (decode 16 kHz audio on the video clock, one centred
5-frame window per video frame, batched encoder forward), random weights, per preset.
HuBERT-large: ``torchaudio.models.hubert_large()`` with random weights (same cost as the
pretrained one that GeneFace / ER-NeRF use), over the same decoded audio, whole clip at once.
Both run with 1 torch thread, as ``extract``'s actors do, interleaved per round. Each preset
also runs as ``extract --precision int8`` does (``models.speech.quantize_int8``: dynamic int8 GRU
and linear weights), with the smallest per-frame cosine between its features and float32's.

FLOPs per second of audio come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions; the encoder's STFT is not counted and is negligible next to the GRU).
"""

from __future__ import annotations

import tempfile
from typing import Any

import harness


def _flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def run(quick: bool) -> dict[str, Any]:
    """RTF of both paths per preset, their ratio, and FLOPs per audio second."""
    import numpy as np
    import torch
    import torchaudio

    from se4lip_dist import media
    from se4lip_dist.config import load_config
    from se4lip_dist.extract import extract_features
    from se4lip_dist.models import build_model
    from se4lip_dist.models.speech import min_cosine, quantize_int8
    from se4lip_dist.sync import centred_audio_windows

    torch.set_num_threads(1)
    clips = harness.grid_videos(1 if quick else 4)
    if not clips:
        from se4lip_dist.synthetic import make_synthetic_clip

        path = f"{tempfile.mkdtemp(prefix='se4lip-bench-ext-')}/clip.mp4"
        make_synthetic_clip(path, seconds=2.0)
        clips = [path]
    rounds = 1 if quick else 3
    presets = ["cpu-small"] if quick else ["cpu-small", "paper"]
    torch.manual_seed(0)
    encoders = {}
    for p in presets:
        cfg = load_config(p)
        enc = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                          window_frames=cfg.train.window_frames).speech.eval()
        encoders[p] = (enc, cfg)
        encoders[f"{p} int8"] = (quantize_int8(enc), cfg)
    variants = list(encoders)
    hubert = torchaudio.models.hubert_large().eval()

    feats: dict[str, list[np.ndarray]] = {}

    def run_encoder(p: str) -> tuple[float, harness.Timer]:
        enc, cfg = encoders[p]
        with harness.Timer() as t:
            out = [extract_features(enc, cfg, c, 25, 256) for c in clips]
        feats[p] = [f for f, _ in out]
        return sum(a for _, a in out), t

    def run_hubert() -> tuple[float, harness.Timer]:
        audio_s = 0.0
        with harness.Timer() as t, torch.no_grad():
            for c in clips:
                wav = media.decode_audio(c, 16000)
                hubert(torch.from_numpy(wav)[None])
                audio_s += len(wav) / 16000
        return audio_s, t

    run_hubert()  # warm-up (allocator, first-call paths)
    for p in variants:
        run_encoder(p)
    # RTF on process CPU time (1 thread: the work itself, whatever else loads the machine).
    rtf: dict[str, list[float]] = {p: [] for p in [*variants, "hubert_large"]}
    wall_rtf: dict[str, list[float]] = {p: [] for p in rtf}
    audio_total = 0.0
    for _ in range(rounds):
        for p in variants:
            a, t = run_encoder(p)
            rtf[p].append(a / t.cpu)
            wall_rtf[p].append(a / t.s)
        a, t = run_hubert()
        rtf["hubert_large"].append(a / t.cpu)
        wall_rtf["hubert_large"].append(a / t.s)
        audio_total = a

    # FLOPs for one second of audio.
    one_s = torch.zeros(16000).uniform_(-0.5, 0.5)
    flops = {}
    for p in presets:
        enc, cfg = encoders[p]
        spf = cfg.data.samples_per_frame
        win = centred_audio_windows(one_s.numpy(), cfg.data.fps, cfg.train.window_frames, spf)
        x = torch.from_numpy(np.ascontiguousarray(win))
        with torch.no_grad():
            flops[p] = _flops(lambda enc=enc, x=x: enc(x))
    with torch.no_grad():
        flops["hubert_large"] = _flops(lambda: hubert(one_s[None]))

    # int8 fidelity: smallest cosine to float32 over every frame of every clip.
    fidelity = {p: min_cosine(torch.from_numpy(np.concatenate(feats[p])),
                              torch.from_numpy(np.concatenate(feats[f"{p} int8"])))
                for p in presets}
    med = {k: harness.median(v) for k, v in rtf.items()}
    metrics = {
        "clips": len(clips), "audio_s_per_round": round(audio_total, 2), "rounds": rounds,
        "threads": 1,
        "real_time_factor_cpu": {k: [round(x, 2) for x in v] for k, v in rtf.items()},
        "real_time_factor_wall": {k: [round(x, 2) for x in v] for k, v in wall_rtf.items()},
        "gflops_per_audio_s": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "int8_min_cosine_to_fp32": {k: round(v, 6) for k, v in fidelity.items()},
        "params_m": {**{p: round(sum(q.numel() for q in encoders[p][0].parameters()) / 1e6, 2)
                        for p in presets},
                     "hubert_large": round(sum(q.numel() for q in hubert.parameters()) / 1e6, 1)},
    }
    h = med["hubert_large"]
    ratios = [
        harness.ratio(
            f"extract: {p} encoder / HuBERT-large real-time factor", med[p] / h, 50.0,
            f"RTF {med[p]:.1f} vs {h:.2f} (CPU time, 1 thread); {flops[p] / 1e9:.2f} vs "
            f"{flops['hubert_large'] / 1e9:.1f} GFLOP per audio second")
        for p in presets
    ] + [
        harness.ratio(
            f"extract: {p} encoder, --precision int8 / HuBERT-large real-time factor",
            med[f"{p} int8"] / h, 50.0,
            f"RTF {med[f'{p} int8']:.1f} ({med[f'{p} int8'] / med[p]:.2f}x float32); min "
            f"cosine to float32 features {fidelity[p]:.5f} over {len(clips)} clips")
        for p in presets
    ]
    return harness.result("extract", metrics, ratios)


if __name__ == "__main__":
    harness.main(run)
