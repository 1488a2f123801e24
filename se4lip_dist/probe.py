"""``probe-visemes``: do speech embeddings separate letters that look the same on the lips?

SE4Lip's Figure 4 claims that its speech encoder, trained only to match lip motion, maps
viseme-identical sounds (d/t, b/p, g/k) close together, while acoustic features keep them apart.
This turns the figure into a number with GRID: every GRID sentence is
``command colour preposition LETTER digit adverb``, and ``align/<id>.align`` gives each word's
span (``start end word`` in 1/25000 s, so ``value / 1000`` is a frame index at 25 fps). For each
pair we gather the letter's audio span, describe it

- with the encoder: the mean over the span's frames of the embedding of the ``window_frames``
  window centred on each frame (:func:`span_embedding`: ``extract``'s per-frame features, from
  :func:`se4lip_dist.sync.centred_audio_windows`, averaged);
- with plain acoustic baselines: the mean log-Mel spectrum (80 bands) and the mean of 13 MFCCs
  over the span,

and report 5-fold cross-validated accuracy of a standardised logistic-regression probe for each.
Accuracy near 0.5 means the two letters are not linearly separable; the claim predicts a lower
accuracy for the encoder than for the baselines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from se4lip_dist import media
from se4lip_dist.config import Config
from se4lip_dist.plots import pyplot, save_figure
from se4lip_dist.registry import embed_waveforms
from se4lip_dist.sync import centred_audio_windows

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("d", "t"), ("b", "p"), ("g", "k"))
UNITS_PER_FRAME = 1000
"""GRID align units per video frame (25000 per second at 25 fps)."""
SILENCE = {"sil", "sp"}
LETTER_INDEX = 3
"""The letter is the 4th spoken word of a GRID sentence."""


class ProbeError(RuntimeError):
    """Missing GRID folders, unusable align files, or too few examples."""


def parse_align(path: str | Path) -> list[tuple[float, float, str]]:
    """Words of a GRID ``.align`` file as ``(start_frame, end_frame, word)`` at 25 fps.

    Raises:
        ProbeError: a line is not ``start end word`` with integer times.
    """
    words = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            start, end = int(parts[0]), int(parts[1])
            word = parts[2]
        except (IndexError, ValueError):
            raise ProbeError(f"{path}:{n}: expected 'start end word', got {line!r}") from None
        words.append((start / UNITS_PER_FRAME, end / UNITS_PER_FRAME, word))
    return words


def spoken_letter(words: list[tuple[float, float, str]]) -> tuple[float, float, str] | None:
    """The letter word ``(start_frame, end_frame, letter)`` of a GRID sentence, or None."""
    spoken = [w for w in words if w[2].lower() not in SILENCE]
    if len(spoken) <= LETTER_INDEX or len(spoken[LETTER_INDEX][2]) != 1:
        return None
    s, e, letter = spoken[LETTER_INDEX]
    return s, e, letter.lower()


def find_examples(grid_dir: str | Path, letters: set[str],
                  max_per_letter: int | None = None) -> list[dict[str, Any]]:
    """Clips of ``grid_dir`` whose spoken letter is in ``letters`` (sorted by id).

    Returns:
        ``[{"id", "video", "letter", "start", "end"}]`` with start/end in frames at 25 fps.
    """
    root = Path(grid_dir)
    align_dir, video_dir = root / "align", root / "video"
    if not align_dir.is_dir() or not video_dir.is_dir():
        raise ProbeError(f"{root}: needs align/ and video/ folders (GRID layout)")
    videos = {p.stem: p for p in video_dir.iterdir() if p.suffix.lower() in (".mp4", ".mpg")}
    counts: dict[str, int] = {}
    out = []
    for a in sorted(align_dir.glob("*.align")):
        if a.stem not in videos:
            continue
        got = spoken_letter(parse_align(a))
        if got is None or got[2] not in letters:
            continue
        s, e, letter = got
        if max_per_letter is not None and counts.get(letter, 0) >= max_per_letter:
            continue
        counts[letter] = counts.get(letter, 0) + 1
        out.append({"id": a.stem, "video": str(videos[a.stem]), "letter": letter,
                    "start": s, "end": e})
    return out


def span_frames(start: float, end: float, n_frames: int) -> tuple[int, int]:
    """Video frames ``[f0, f1)`` that a word from ``start`` to ``end`` (in frames) covers.

    At least one frame, and never past the clip's ``n_frames``.
    """
    f0 = min(n_frames - 1, int(np.floor(start)))
    f1 = min(n_frames, max(f0 + 1, int(np.ceil(end))))
    return f0, f1


def span_embedding(encoder: Any, cfg: Config, audio: np.ndarray, f0: int, f1: int,
                   spf: int) -> np.ndarray:
    """Mean speech embedding over frames ``f0 .. f1 - 1``, one centred window per frame.

    Equal to the mean of rows ``f0:f1`` of ``extract``'s per-frame features of the same audio.

    Returns:
        float32 ``[D]``.
    """
    windows = centred_audio_windows(audio, f1, cfg.train.window_frames, spf)[f0:f1]
    return embed_waveforms(encoder, np.ascontiguousarray(windows), cfg).mean(0)


def _features(examples: list[dict[str, Any]], encoder: Any, cfg: Config,
              fps: int = 25) -> dict[str, np.ndarray]:
    """Encoder, log-Mel and MFCC span features, one row per example."""
    sr = cfg.data.sample_rate
    spf = sr // fps
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sr, n_fft=512, win_length=400,
                                               hop_length=160, n_mels=80)
    mfcc = torchaudio.transforms.MFCC(sample_rate=sr, n_mfcc=13,
                                      melkwargs={"n_fft": 512, "win_length": 400,
                                                 "hop_length": 160, "n_mels": 40})
    enc_rows, mel_rows, mfcc_rows = [], [], []
    for ex in examples:
        audio = media.decode_audio(ex["video"], sr)
        f0, f1 = span_frames(ex["start"], ex["end"], max(1, len(audio) // spf))
        enc_rows.append(span_embedding(encoder, cfg, audio, f0, f1, spf))
        span = torch.from_numpy(audio[f0 * spf:f1 * spf].copy())
        with torch.no_grad():
            mel_rows.append(torch.log(mel(span) + 1e-6).mean(-1).numpy())
            mfcc_rows.append(mfcc(span).mean(-1).numpy())
    return {"encoder": np.stack(enc_rows), "log_mel": np.stack(mel_rows),
            "mfcc": np.stack(mfcc_rows)}


def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float | None:
    """Cross-validated accuracy of a standardised logistic-regression probe (None: too few)."""
    k = min(folds, int(np.bincount(y).min()) if len(np.unique(y)) == 2 else 0)
    if k < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv, scoring="accuracy").mean())


def _plot_pair(feats: dict[str, np.ndarray], y: np.ndarray, pair: tuple[str, str],
               accs: dict[str, float | None], path: Path) -> Path:
    fig, axes = pyplot().subplots(1, len(feats), figsize=(4.2 * len(feats), 4))
    for ax, (kind, x) in zip(np.atleast_1d(axes), feats.items(), strict=True):
        z = PCA(n_components=2, random_state=0).fit_transform(StandardScaler().fit_transform(x))
        for label, marker in ((0, "o"), (1, "^")):
            ax.scatter(z[y == label, 0], z[y == label, 1], marker=marker, s=18, alpha=0.7,
                       label=pair[label])
        acc = accs.get(kind)
        ax.set_title(f"{kind}: probe acc {acc:.2f}" if acc is not None else kind)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend()
    fig.suptitle(f"/{pair[0]}/ vs /{pair[1]}/ (same viseme)")
    fig.tight_layout()
    return save_figure(fig, path)


def probe_pairs(encoder: Any, cfg: Config, grid_dir: str | Path, *,
                pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS,
                plot: str | Path | None = None, max_per_letter: int | None = None,
                folds: int = 5) -> dict[str, Any]:
    """The probe with an already-loaded speech encoder (see :func:`run_probe`)."""
    encoder.eval()
    letters = {c for p in pairs for c in p}
    examples = find_examples(grid_dir, letters, max_per_letter)
    if not examples:
        raise ProbeError(f"{grid_dir}: no clip speaks any of the letters {sorted(letters)}")
    feats = _features(examples, encoder, cfg)
    labels = np.array([e["letter"] for e in examples])
    plot_dir = Path(plot) if plot else None
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for a, b in pairs:
        keep = (labels == a) | (labels == b)
        y = (labels[keep] == b).astype(int)
        sub = {k: v[keep] for k, v in feats.items()}
        accs = {k: probe_accuracy(v, y, folds) for k, v in sub.items()}
        row: dict[str, Any] = {"pair": f"{a}/{b}", "n": {a: int((y == 0).sum()),
                                                          b: int((y == 1).sum())},
                               **{f"{k}_acc": v for k, v in accs.items()}}
        enc, base = accs["encoder"], [accs["log_mel"], accs["mfcc"]]
        if enc is not None and all(v is not None for v in base):
            row["encoder_separates_less"] = bool(enc < min(base))  # type: ignore[type-var]
        if plot_dir and len(y) >= 3:
            row["plot"] = str(_plot_pair(sub, y, (a, b), accs, plot_dir / f"visemes_{a}-{b}.png"))
        results.append(row)
    verdict = [r.get("encoder_separates_less") for r in results]
    return {
        "pairs": results,
        "clips": len(examples),
        "claim_holds_for": [r["pair"] for r in results if r.get("encoder_separates_less")],
        "claim": "the encoder separates viseme-identical letters less than acoustic features",
        "summary": (f"encoder below both baselines for {sum(bool(v) for v in verdict)} of "
                    f"{len(results)} pairs"),
    }


def run_probe(
    model_uri_or_none: str | None,
    grid_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS,
    plot: str | Path | None = None,
    max_per_letter: int | None = None,
    preset: str = "cpu-small",
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe accuracy per viseme-identical letter pair: encoder vs acoustic baselines.

    Args:
        model_uri_or_none: a logged/registered speech encoder; None: a randomly initialised
            encoder of ``preset`` (a control: what the architecture alone gives).
        grid_dir: a GRID speaker folder with ``align/*.align`` and ``video/*.mp4``.
        tracking_uri: MLflow tracking URI that resolves ``models:/`` URIs.
        pairs: letter pairs to probe.
        plot: folder for one 2-D PCA PNG per pair (encoder and baselines side by side).
        max_per_letter: use at most this many clips per letter.
        preset: config preset of the random encoder.
        seed: its initialisation seed.

    Returns:
        ``pairs``: per pair ``{"pair", "n", "encoder_acc", "log_mel_acc", "mfcc_acc",
        "encoder_separates_less", "plot"}``; ``clips``; ``claim_holds_for``; ``summary``;
        ``model_uri``.

    Raises:
        ProbeError: missing GRID folders or no matching clips.
        RegistryError: the model cannot be loaded.
    """
    if model_uri_or_none is None:
        import torch

        from se4lip_dist.config import load_config
        from se4lip_dist.models import SpeechEncoder

        cfg = load_config(preset)
        torch.manual_seed(seed)
        encoder = SpeechEncoder(cfg.model, cfg.data.sample_rate).eval()
    else:
        from se4lip_dist.registry import load_encoder

        encoder, cfg = load_encoder(model_uri_or_none, tracking_uri)
    out = probe_pairs(encoder, cfg, grid_dir, pairs=tuple(pairs), plot=plot,
                      max_per_letter=max_per_letter)
    out["model_uri"] = model_uri_or_none
    return out


__all__ = [
    "DEFAULT_PAIRS",
    "ProbeError",
    "find_examples",
    "parse_align",
    "probe_accuracy",
    "probe_pairs",
    "run_probe",
    "span_embedding",
    "span_frames",
    "spoken_letter",
]
