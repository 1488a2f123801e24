"""One frozen dataclass per concern, YAML presets and dotted ``key=value`` overrides.

The resolved :class:`Config` is the single source of truth for every stage. At the Ray boundary it
travels as a plain dict (:meth:`Config.to_dict`) and is rebuilt with :meth:`Config.from_dict` on
the first line of the worker function, because Ray Tune edits nested dict paths.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config file, preset or override that cannot be applied."""


HEADLINE = "val/shift_acc"
"""The headline validation metric (``se4lip_dist.validation``): the share of held-out units
whose AV offset is recovered at every applied audio shift. Runs, searches and the gate rank by
it unless told otherwise."""


@dataclass(frozen=True)
class DataConfig:
    """How videos become aligned lip crops and audio in the shards."""

    fps: int = 25
    """Video frames per second after resampling by timestamp."""
    sample_rate: int = 16000
    """Audio samples per second (mono) after resampling."""
    crop_size: int = 96
    """Side in pixels of the square mouth-centred crop stored in the shards."""
    jpeg_quality: int = 90
    """JPEG quality of the stored crops."""
    segment_frames: int = 250
    """Longest run of frames in one shard row; longer clips are split into segments."""
    shard_bytes: int = 128 * 1024 * 1024
    """Target upper bound of one Parquet shard file."""

    def __post_init__(self) -> None:
        _check(self.fps > 0, "data.fps must be positive")
        _check(self.sample_rate % self.fps == 0, "data.sample_rate must be a multiple of data.fps")
        _check(16 <= self.crop_size <= 512, "data.crop_size must be in [16, 512]")
        _check(1 <= self.jpeg_quality <= 100, "data.jpeg_quality must be in [1, 100]")
        _check(self.segment_frames >= 16, "data.segment_frames must be >= 16")
        _check(self.shard_bytes >= 1024 * 1024, "data.shard_bytes must be >= 1 MiB")

    @property
    def samples_per_frame(self) -> int:
        """Audio samples that belong to one video frame (640 at 16 kHz / 25 fps)."""
        return self.sample_rate // self.fps


@dataclass(frozen=True)
class FaceConfig:
    """Face detection and mouth tracking used by ``prepare``."""

    backend: str = "insightface"
    """``insightface`` (SCRFD boxes + 5 keypoints) or ``none`` (fixed box for pre-cropped faces)."""
    insightface_root: str | None = None
    """InsightFace model root holding ``models/<pack>/``; None: ``$SE4LIP_INSIGHTFACE_ROOT``,
    else ``~/.insightface``."""
    pack: str = "buffalo_sc"
    """InsightFace model pack whose detector is used."""
    det_size: int = 320
    """Detector input size in pixels along the frame's longer side (the shorter side keeps the
    aspect ratio, padded to a multiple of 32 with some margin)."""
    det_threshold: float = 0.5
    """Minimum detection score."""
    detect_every: int = 32
    """Run the detector on every k-th frame (and where ``refine_motion`` asks) and interpolate
    keypoints in between."""
    refine_motion: float = 0.03
    """Also detect midway between two detections whose keypoints moved by more than this
    fraction of the face size (eye-to-mouth + inter-ocular distance), recursively down to a few
    frames apart: a still head is detected every ``detect_every`` frames, a moving one closely.
    0 disables (a fixed interval)."""
    smooth_window: int = 1
    """Centred line fit over this many detections (odd; 1 = none). Wider windows lag a moving
    head."""
    mouth_scale: float = 0.9
    """Crop side = mouth_scale x (eye-to-mouth + inter-ocular distance)."""
    fixed_mouth: tuple[float, float, float] = (0.5, 0.75, 0.35)
    """Backend ``none``: mouth centre x, y and crop side as fractions of the frame."""
    max_missing_fraction: float = 0.5
    """A clip fails when more than this fraction of its detections found no face."""

    def __post_init__(self) -> None:
        _check(self.backend in ("insightface", "none"), "face.backend must be insightface|none")
        _check(self.detect_every >= 1, "face.detect_every must be >= 1")
        _check(0.0 <= self.refine_motion <= 1.0, "face.refine_motion must be in [0, 1]")
        _check(self.smooth_window >= 1 and self.smooth_window % 2 == 1,
               "face.smooth_window must be odd and >= 1")
        _check(0.0 < self.mouth_scale <= 4.0, "face.mouth_scale must be in (0, 4]")
        _check(len(self.fixed_mouth) == 3, "face.fixed_mouth must be (x, y, side)")
        _check(0.0 <= self.max_missing_fraction <= 1.0, "face.max_missing_fraction in [0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Speech and lip encoders (pure torch; see ``se4lip_dist.models``)."""

    frontend: str = "stft"
    """Speech front end: ``stft`` (log-magnitude, the paper) or ``mel`` (ablation)."""
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 128
    n_mels: int = 80
    """Mel bands when ``frontend=mel``."""
    backbone: str = "gru"
    """Speech backbone: ``gru`` (the paper) or ``cnn`` (Wav2Lip-style conv encoder, ablation)."""
    gru_layers: int = 8
    embed_dim: int = 512
    """Embedding size of both encoders (the GRU's hidden size, the lip CNN's last channels)."""
    lip_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    """Channel widths of the lip CNN stages (Table 2: 32, 64, 128, 256, 512)."""
    lip_height: int = 96
    lip_width: int = 96
    """Lip input size; taken from the centre of the stored crop (resized when larger)."""
    cnn_channels: tuple[int, ...] = (32, 64, 128, 256)
    """Channel widths of the ``cnn`` speech backbone."""

    def __post_init__(self) -> None:
        _check(self.frontend in ("stft", "mel"), "model.frontend must be stft|mel")
        _check(self.backbone in ("gru", "cnn"), "model.backbone must be gru|cnn")
        _check(self.gru_layers >= 1, "model.gru_layers must be >= 1")
        _check(self.win_length <= self.n_fft, "model.win_length must be <= model.n_fft")
        _check(len(self.lip_channels) == 5, "model.lip_channels needs 5 stage widths")
        _check(self.lip_height >= 16 and self.lip_width >= 16, "model.lip_* must be >= 16")


@dataclass(frozen=True)
class TrainConfig:
    """Pair sampling, optimisation and validation."""

    window_frames: int = 5
    """Video frames per lip window (and the matching audio span)."""
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.0
    epochs: int = 10
    """Passes over the training data (see ``steps_per_epoch`` for small data)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (None: run all epochs)."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch, drawing fresh pairs as often as needed (None: one pass of
    ``pairs_per_segment`` pairs per shard row). Makes minutes of video train properly."""
    init: str | None = None
    """Warm start: a model URI (``models:/NAME@ALIAS``, ``runs:/...``) or a training checkpoint
    folder whose encoders a fresh run starts from (same architecture)."""
    freeze_lips: bool = False
    """Keep the lip encoder's weights fixed (e.g. fine-tuning a warm start on one subject)."""
    lips_lr_scale: float = 1.0
    """The lip encoder's learning rate relative to ``lr``."""
    pairs_per_segment: int = 8
    """Training pairs sampled from each shard row per epoch."""
    hard_negative_fraction: float = 0.5
    """Of the same-clip negatives, the share taken a few frames away (the rest far away)."""
    cross_clip_fraction: float = 0.25
    """Of all negatives, the share whose audio comes from another clip."""
    hard_offset_max: int = 3
    """Hard negatives are shifted by 2..hard_offset_max frames."""
    split: str = "clip"
    """What validates (``se4lip_dist.splits``): ``clip`` (whole clips), ``speaker`` (whole
    speakers) or ``time`` (the tail of every clip: one subject's video)."""
    val_fraction: float = 0.1
    """Share held out for validation: of the clips (``clip``, when the manifest has no split),
    of the speakers (``speaker``) or of every clip's frames (``time``)."""
    split_guard: int | None = None
    """``time`` split: frames left out between a clip's training head and validation tail
    (default: window_frames + max_offset, so no validation search reaches training frames)."""
    max_offset: int = 15
    """AV-offset search range in frames (syncnet_python uses +-15)."""
    val_shifts: tuple[int, ...] = (-3, 0, 3)
    """Validation also delays/advances the audio by these many frames and expects the offset
    search to find each shift, so an encoder biased towards offset 0 cannot score well."""
    val_max_clips: int = 256
    """Validation clips scored at most (a fixed subset when there are more)."""
    val_chunk_frames: int | None = None
    """Search the offset in consecutive pieces of this many frames instead of whole clips
    (long held-out tails: more, shorter searches; None: whole clips)."""
    val_min_units: int = 8
    """Held-out units (clips, or ``val_chunk_frames`` pieces) the registry gate needs before it
    promotes: fewer is reported as evidence too thin, whatever the score."""
    gate_alpha: float = 0.05
    """Level of the gate's one-sided paired test (exact McNemar on per-unit hits): a version
    replaces the champion only when it is significantly better on the same units."""
    select_metric: str = HEADLINE
    """Validation metric that picks a run's best epoch (the weights that get registered)."""
    grad_clip: float = 1.0
    amp: bool = True
    """Mixed precision (autocast) on GPU; ignored on CPU."""
    amp_dtype: str = "bf16"
    """``bf16`` (Ampere and newer) or ``fp16`` (older GPUs; adds a checkpointed GradScaler)."""
    shuffle_buffer: int = 0
    """Shard rows mixed in each training worker before pairs are sampled (0: off). Files come
    in a seeded order that changes every epoch, and pairs are shuffled within each block."""
    seed: int = 0
    """Seeds the model initialisation, the per-epoch file order and the training pairs (with
    one worker a run repeats exactly). Validation pairs use a fixed seed of their own."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    cpus_per_worker: float = 0.5
    """CPUs of a rank that trains on CPUs. Fractional CPUs leave room for Ray Data: reserving
    every CPU on 2 cores hangs Ray."""
    cpus_per_gpu_worker: float = 2.0
    """CPUs of a rank that trains on a GPU (``train``/``subject --use-gpu``, ``tune
    --gpus-per-trial`` without ``--cpus-per-trial``). Each rank decodes its JPEG frames and
    samples its pairs in its own collate threads; benchmarks/README.md ("What a GPU node needs")
    puts a rank that keeps a GPU busy at 2-3 cores."""

    def __post_init__(self) -> None:
        _check(self.window_frames >= 1, "train.window_frames must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size must be >= 2")
        _check(self.lr > 0, "train.lr must be positive")
        _check(0.0 <= self.hard_negative_fraction <= 1.0, "train.hard_negative_fraction in [0, 1]")
        _check(0.0 <= self.cross_clip_fraction <= 1.0, "train.cross_clip_fraction in [0, 1]")
        _check(0.0 < self.val_fraction < 1.0, "train.val_fraction in (0, 1)")
        _check(self.split in ("clip", "speaker", "time"), "train.split must be clip|speaker|time")
        _check(self.split_guard is None or self.split_guard >= 0, "train.split_guard >= 0")
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
               "train.steps_per_epoch must be >= 1")
        _check(self.lips_lr_scale >= 0.0, "train.lips_lr_scale must be >= 0")
        _check(self.hard_offset_max >= 2, "train.hard_offset_max must be >= 2")
        _check(self.max_offset >= 1, "train.max_offset must be >= 1")
        _check(self.amp_dtype in ("bf16", "fp16"), "train.amp_dtype must be bf16|fp16")
        _check(0 in self.val_shifts, "train.val_shifts must include 0 (the clip as recorded)")
        _check(all(abs(s) < self.max_offset for s in self.val_shifts),
               "train.val_shifts must stay inside +-(train.max_offset - 1)")
        _check(len(set(self.val_shifts)) == len(self.val_shifts), "train.val_shifts repeat")
        _check(self.val_max_clips >= 1, "train.val_max_clips must be >= 1")
        _check(self.val_min_units >= 1, "train.val_min_units must be >= 1")
        _check(0.0 < self.gate_alpha < 0.5, "train.gate_alpha must be in (0, 0.5)")
        _check(self.val_chunk_frames is None
               or self.val_chunk_frames > self.window_frames + self.max_offset,
               "train.val_chunk_frames must exceed window_frames + max_offset")
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker must be positive")
        _check(self.cpus_per_gpu_worker > 0, "train.cpus_per_gpu_worker must be positive")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentations for voices and faces never seen (``se4lip_dist.augment``).

    Each is applied to a training pair with its probability (0: off); validation never is.
    """

    noise_p: float = 0.0
    """Additive noise (white or brown) at ``noise_snr_db``."""
    noise_snr_db: tuple[float, float] = (5.0, 30.0)
    reverb_p: float = 0.0
    """Convolution with a synthetic room response (exponentially decaying noise)."""
    reverb_rt60_s: tuple[float, float] = (0.1, 0.6)
    speed_p: float = 0.0
    """Resampling by a factor in ``speed_range`` (shifts pitch and vocal-tract length together),
    cut or padded back to the window's length around its centre."""
    speed_range: tuple[float, float] = (0.9, 1.1)
    color_p: float = 0.0
    """Brightness, contrast and saturation jitter of the lip crops (one draw per window)."""
    color_strength: float = 0.3
    affine_p: float = 0.0
    """A small shift and scale of the lip crops (one draw per window)."""
    affine_shift: float = 0.06
    """Largest shift as a fraction of the crop side."""
    affine_scale: float = 0.08
    """Largest relative zoom in or out."""
    blur_p: float = 0.0
    """Gaussian blur of the lip crops (sigma 0.5-1.5 px)."""

    def __post_init__(self) -> None:
        for name in ("noise_p", "reverb_p", "speed_p", "color_p", "affine_p", "blur_p"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"augment.{name} must be in [0, 1]")
        for name in ("noise_snr_db", "reverb_rt60_s", "speed_range"):
            lo, hi = getattr(self, name)
            _check(lo <= hi, f"augment.{name} must be [low, high]")
        _check(self.speed_range[0] > 0.5, "augment.speed_range must stay above 0.5")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, n) > 0 for n in ("noise_p", "reverb_p", "speed_p", "color_p",
                                                   "affine_p", "blur_p"))


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), safe for YAML, JSON and Ray."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild from :meth:`to_dict` output, validating every section."""
        return _build(cls, d, "")

    def override(self, overrides: dict[str, Any]) -> Config:
        """Apply ``{"section.key": value}`` overrides (values already parsed)."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(d, dotted, value)
        return Config.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS: dict[str, type] = {
    name: hint for name, hint in get_type_hints(Config).items() if name != "preset"
}
"""Config sections by name (``train`` -> :class:`TrainConfig`)."""


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(
    preset: str = "paper",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Resolve preset, then config file, then ``key=value`` overrides (later wins).

    Args:
        preset: name of a YAML preset in ``se4lip_dist/presets``.
        config_file: optional YAML file with the same nesting as :meth:`Config.to_dict`.
        overrides: strings like ``model.gru_layers=4``; values are parsed as YAML scalars.

    Raises:
        ConfigError: unknown preset/key, bad value or a failed validation.
    """
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; choose one of {list_presets()}")
    d = _read_yaml(path)
    d["preset"] = preset
    if config_file is not None:
        for dotted, value in flatten(_read_yaml(Path(config_file))).items():
            _set_dotted(d, dotted, value)
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(d, key, value)
    return Config.from_dict(d)


def key_hint(key: str) -> Any:
    """The type of config key ``section.name`` as declared on its dataclass.

    Raises:
        ConfigError: unknown key.
    """
    section, _, name = key.partition(".")
    cls = _SECTIONS.get(section)
    hints = get_type_hints(cls) if cls else {}
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}")
    return hints[name]


def key_doc(key: str) -> str:
    """The docstring written under config key ``section.name`` in this module, on one line."""
    key_hint(key)  # refuses unknown keys
    return _field_docs().get(key, "")


@functools.cache
def _field_docs() -> dict[str, str]:
    """``{"section.name": docstring}`` from the attribute docstrings of the section classes."""
    names = {cls.__name__: section for section, cls in _SECTIONS.items()}
    docs: dict[str, str] = {}
    for node in ast.parse(Path(__file__).read_text()).body:
        if not (isinstance(node, ast.ClassDef) and node.name in names):
            continue
        for field_node, doc in zip(node.body, node.body[1:], strict=False):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                text = " ".join(doc.value.value.split()).replace("``", "")
                docs[f"{names[node.name]}.{field_node.target.id}"] = text
    return docs


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.gru_layers=4"]`` -> ``{"model.gru_layers": 4}`` (values read as YAML scalars).

    Raises:
        ConfigError: an item that is not ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"section.key": value}`` (the form of ``--set`` and MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def shapes_weights(key: str) -> bool:
    """True for the dotted keys a checkpoint's weights depend on (``model.*`` and the window):
    a checkpoint cannot carry on under another value of these."""
    return key.startswith("model.") or key == "train.window_frames"


def architecture_diff(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's value, b's value)}`` for the :func:`shapes_weights` keys that differ."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return {k: (v, fb.get(k)) for k, v in fa.items() if shapes_weights(k) and v != fb.get(k)}


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce YAML scalars to the annotated type (ints for floats, lists for tuples)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    if optional and len(args) == 1:
        hint = args[0]
    if get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = get_args(hint)[0]
        return tuple(_coerce(v, inner, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if hint is int and not float(value).is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


__all__ = [
    "HEADLINE",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FaceConfig",
    "ModelConfig",
    "TrainConfig",
    "flatten",
    "key_doc",
    "key_hint",
    "list_presets",
    "load_config",
    "parse_overrides",
    "replace",
]

