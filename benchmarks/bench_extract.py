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

Bounds: HuBERT-large (what GeneFace / ER-NeRF users run instead; its RTF over the encoder's,
against their FLOP ratio, says whether each FLOP costs the same), and the FLOP bound: achieved
GFLOP per CPU second against this machine's matmul GFLOP per CPU second, measured in the same
run at the same thread count (float32: a square ``torch.mm``; int8: a dynamic int8
``Linear``, the kernel ``--precision int8`` uses), interleaved with the rounds.
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


GEMM_N = 1024
"""Side of the square matmul that measures the machine's GFLOP/s."""


def matmul_gflops(n: int = GEMM_N, reps: int = 5) -> dict[str, float]:
    """GFLOP per CPU second of an n x n x n float32 ``torch.mm`` and of a dynamic int8 Linear.

    Both count ``2 n^3`` FLOPs per product (what ``FlopCounterMode`` counts for a linear layer);
    the int8 one includes quantizing its input, as ``quantize_int8``'s layers do. Best of
    ``reps`` (the machine's bound, not its average).
    """
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    lin = torch.nn.Linear(n, n, bias=False).eval()
    qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                  dtype=torch.qint8)
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in (("float32", lambda: torch.mm(a, b)), ("int8", lambda: qlin(a))):
            fn()
            best = 0.0
            for _ in range(reps):
                with harness.Timer() as t:
                    fn()
                best = max(best, 2 * n**3 / max(t.cpu, 1e-9) / 1e9)
            out[name] = best
    return out


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
    why = "" if clips else f"synthetic 2 s clip: {harness.missing_reason()}"
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
    gemm: dict[str, list[float]] = {"float32": [], "int8": []}
    for _ in range(rounds):
        for k, v in matmul_gflops(512 if quick else GEMM_N).items():
            gemm[k].append(v)
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
    peak = {k: max(v) for k, v in gemm.items()}
    # Achieved GFLOP per CPU second: FLOPs per audio second x audio seconds per CPU second.
    achieved = {v: flops[v.split()[0]] * med[v] / 1e9 for v in variants}
    achieved["hubert_large"] = flops["hubert_large"] * med["hubert_large"] / 1e9
    metrics = {
        "clips": len(clips), "audio_s_per_round": round(audio_total, 2), "rounds": rounds,
        "threads": 1,
        "real_time_factor_cpu": {k: [round(x, 2) for x in v] for k, v in rtf.items()},
        "real_time_factor_wall": {k: [round(x, 2) for x in v] for k, v in wall_rtf.items()},
        "gflops_per_audio_s": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "achieved_gflop_per_cpu_s": {k: round(v, 2) for k, v in achieved.items()},
        "matmul_gflop_per_cpu_s": {k: [round(x, 1) for x in v] for k, v in gemm.items()},
        "matmul_n": 512 if quick else GEMM_N,
        "int8_min_cosine_to_fp32": {k: round(v, 6) for k, v in fidelity.items()},
        "params_m": {**{p: round(sum(q.numel() for q in encoders[p][0].parameters()) / 1e6, 2)
                        for p in presets},
                     "hubert_large": round(sum(q.numel() for q in hubert.parameters()) / 1e6, 1)},
    }
    h = med["hubert_large"]
    label = f" [{why}]" if why else ""
    ratios = []
    for p in presets:
        flop_ratio = flops["hubert_large"] / flops[p]
        for v, prec in ((p, "float32"), (f"{p} int8", "int8")):
            extra = (f"; {med[v] / med[p]:.2f}x float32, min cosine to float32 features "
                     f"{fidelity[p]:.5f}" if prec == "int8" else "")
            ratios.append(harness.ratio(
                f"extract: {p} encoder, {prec} / HuBERT-large real-time factor", med[v] / h,
                # A tiny encoder is bound by per-call overhead, not FLOPs: no FLOP target.
                round(flop_ratio, 2) if flops[p] > 1e9 else None,
                f"RTF {med[v]:.1f} vs {h:.2f} (CPU time, 1 thread); {flops[p] / 1e9:.2f} vs "
                f"{flops['hubert_large'] / 1e9:.1f} GFLOP per audio s, FLOP ratio "
                f"{flop_ratio:.2f}{' = target' if flops[p] > 1e9 else ''}{extra}{label}",
                bound="HuBERT-large float32 RTF, same thread and audio"))
            ratios.append(harness.ratio(
                f"extract: {p} encoder, {prec}: achieved / matmul GFLOP/s",
                achieved[v] / peak[prec], None,
                f"{achieved[v]:.1f} vs {peak[prec]:.1f} GFLOP per CPU s ({prec} "
                f"{metrics['matmul_n']}-square matmul, 1 thread, same run){label}",
                bound=f"{prec} matmul GFLOP/s (1 thread)"))
    ratios.append(harness.ratio(
        "extract: HuBERT-large float32: achieved / matmul GFLOP/s",
        achieved["hubert_large"] / peak["float32"], None,
        f"{achieved['hubert_large']:.1f} vs {peak['float32']:.1f} GFLOP per CPU s{label}",
        bound="float32 matmul GFLOP/s (1 thread)"))
    inputs = {"data": "synthetic" if why else "grid", "why_synthetic": why or None,
              "clips": len(clips), "audio_s": round(audio_total, 2), "presets": presets}
    return harness.result("extract", metrics, ratios, inputs=inputs)


if __name__ == "__main__":
    harness.main(run)
