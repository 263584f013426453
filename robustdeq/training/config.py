"""Training configuration: YAML files under ``training/configs/`` plus ``--set key=value``.

Every field has a default that follows paper 1 Appendix A (docs/design.md §4); a config file
only states what differs. Unknown keys are errors (a typo must not silently train the
wrong recipe). Numbers may be written as fractions, e.g. ``eps: 8/255``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import yaml

from ..data.run_splits import IMAGEFOLDER  # data.source of your own images
from ..number_parsing import parse_number  # its home; re-exported here for old imports
from ..readout import READOUT_RULES

__all__ = [
    "TrainConfig",
    "ModelSection",
    "DataSection",
    "OptimSection",
    "PretrainSection",
    "ObjectiveSection",
    "AttackSection",
    "ValidationSection",
    "RunSection",
    "load_config",
    "apply_overrides",
    "config_diff",
    "OBJECTIVES",
    "ATTACKS",
    "OPTIMIZERS",
    "SCHEDULES",
]

OBJECTIVES = ("clean", "pgd_at", "trades")
ATTACKS = ("pgd", "fgsm_rs", "nfgsm")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant", "onecycle")


@dataclass
class ModelSection:
    name: str = "deq-tiny"
    overrides: Dict[str, Any] = field(default_factory=dict)  # constructor arguments, e.g. {n_steps: 8}


@dataclass
class DataSection:
    # CIFAR-10: a JPEG archive, a cifar-10-batches-py folder or "torchvision" (None = the default archive);
    # "imagefolder": your own images under data.root (robustdeq/data/image_folder.py)
    source: Optional[str] = None
    val_size: int = 5000  # CIFAR-10: carved from the training set, class-stratified
    split_seed: int = 0
    augment: bool = True  # random crop (padding: an eighth of the side) + horizontal flip
    epoch_size: Optional[int] = None  # samples per epoch; None = one full pass
    train_subset: Optional[int] = None  # train on the first K training images only (tests, debugging)
    # ---- data.source = imagefolder ----
    root: Optional[str] = None  # train/ [val/] [test/] class folders, or class folders split by seed
    input_size: int = 32  # images are scaled to cover it and centre-cropped (robustdeq/image_size.py)
    val_fraction: float = 0.1  # held out from train when there is no val/ folder (stratified)
    test_fraction: float = 0.1  # held out when the root holds class folders directly
    on_bad_file: str = "skip"  # skip (listed in the log and summary) | fail
    mean: Optional[List[float]] = None  # per-channel statistics; None = computed on the training split
    std: Optional[List[float]] = None
    workers: int = 0  # processes decoding images (indexing, and batches of a streaming split)
    in_memory_mb: float = 2048  # a split whose pixels fit this is decoded once and kept in memory


@dataclass
class OptimSection:
    name: str = "adam"  # adam | sgd (SGD with momentum, Nesterov by default)
    lr: float = 1e-3  # the peak learning rate
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    batch_size: int = 96  # global batch (split across DDP processes)
    epochs: int = 210
    schedule: str = "cosine"  # cosine | constant | onecycle (linear up to the peak, then linear down to 0)
    onecycle_peak: float = 0.4  # onecycle: the fraction of the run at which the learning rate peaks
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None  # exponential moving average of the weights (validated and shipped)


@dataclass
class PretrainSection:
    """Clean pretraining as a weight-tied unrolled network (the first ``steps`` steps)."""

    steps: int = 0
    depth: Optional[int] = None  # unrolled layers; None = the model's N


@dataclass
class ObjectiveSection:
    kind: str = "pgd_at"  # clean | pgd_at | trades
    trades_beta: float = 6.0  # 1/lambda in TRADES
    random_depth: bool = False  # paper 1 Sec. 3.3: loss on z[n], n ~ U{1..N}
    redraw_depth_in_attack: bool = False  # the reference redraws n at every attack step; we do not by default
    unroll: int = 5  # phantom gradient K
    tau: float = 0.5  # phantom gradient damping
    jacobian_weight: float = 0.0  # Hutchinson ||J_f||_F^2 regulariser
    jacobian_every: int = 1  # apply the regulariser every k steps (MDEQ uses a frequency too)
    jacobian_fraction: float = 1.0  # probe this fraction of the batch's samples (an unbiased estimate of the mean)
    attack_unroll: Optional[int] = None  # phantom unroll K inside the training attack (None = objective.unroll)


@dataclass
class AttackSection:
    """The inner maximisation of PGD-AT / TRADES (made in eval mode)."""

    kind: str = "pgd"  # pgd | fgsm_rs (Wong et al. 2020) | nfgsm (de Jorge et al. 2022)
    eps: float = 8 / 255
    step_size: float = 2 / 255  # fgsm_rs: 1.25 eps is usual; nfgsm: eps
    steps: int = 10  # pgd only
    random_start: bool = True  # pgd only (the single-step attacks always start from noise)
    noise: float = 2.0  # single-step attacks: uniform start noise in +-noise*eps (nfgsm: 2; fgsm_rs: 1)


@dataclass
class ValidationSection:
    every: int = 1  # epochs between validations
    n_clean: int = 1000  # validation images for clean accuracy
    n_robust: int = 500  # validation images for PGD accuracy
    pgd_steps: int = 10
    pgd_step_size: float = 2 / 255
    eps: float = 8 / 255
    selection_n: int = 1000  # validation images for choosing the early state (0 = keep the preset)
    # how the readout state is chosen: robust (highest PGD accuracy, paper 1 Sec. 4), clean (highest
    # clean accuracy) or final (z[N]: a plain-trained model, read at its fixed point as in paper 2)
    select: str = "robust"
    batch_size: int = 250
    # catastrophic overfitting (single-step attacks): validation PGD accuracy this far below the best epoch's
    collapse_drop: float = 0.10
    on_collapse: str = "stop"  # stop (finish from the best epoch's weights) | warn


@dataclass
class RunSection:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    threads: Optional[int] = None  # torch CPU threads
    log_every: int = 10  # steps between log records
    checkpoint_every: int = 200  # steps between resume checkpoints (also at every epoch end)


@dataclass
class TrainConfig:
    name: str = "run"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    attack: AttackSection = field(default_factory=AttackSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "TrainConfig":
        cfg = _build(cls, raw or {}, "")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from ..models import MODEL_PRESETS

        problems: List[str] = []
        if self.model.name not in MODEL_PRESETS:
            problems.append(f"model.name {self.model.name!r} is not registered ({', '.join(sorted(MODEL_PRESETS))})")
        elif MODEL_PRESETS[self.model.name][0].explicit and self.objective.jacobian_weight > 0:
            problems.append(
                f"objective.jacobian_weight must be 0 for the explicit network {self.model.name!r} (its f ignores z)"
            )
        if self.objective.kind not in OBJECTIVES:
            problems.append(f"objective.kind must be one of {', '.join(OBJECTIVES)}, got {self.objective.kind!r}")
        choices = {
            "optim.name": (self.optim.name, OPTIMIZERS),
            "optim.schedule": (self.optim.schedule, SCHEDULES),
            "attack.kind": (self.attack.kind, ATTACKS),
            "validation.on_collapse": (self.validation.on_collapse, ("stop", "warn")),
            "validation.select": (self.validation.select, READOUT_RULES),
        }
        problems += [
            f"{k} must be one of {', '.join(options)}, got {v!r}"
            for k, (v, options) in choices.items()
            if v not in options
        ]
        if not 0 < self.optim.onecycle_peak < 1:
            problems.append(f"optim.onecycle_peak must be in (0, 1), got {self.optim.onecycle_peak}")
        if self.optim.ema_decay is not None and not 0 < self.optim.ema_decay < 1:
            problems.append(f"optim.ema_decay must be in (0, 1), got {self.optim.ema_decay}")
        positive = {
            "optim.lr": self.optim.lr,
            "optim.batch_size": self.optim.batch_size,
            "optim.epochs": self.optim.epochs,
            "objective.jacobian_every": self.objective.jacobian_every,
            "run.log_every": self.run.log_every,
            "run.checkpoint_every": self.run.checkpoint_every,
            "validation.every": self.validation.every,
            "validation.batch_size": self.validation.batch_size,
        }
        problems += [f"{k} must be > 0, got {v}" for k, v in positive.items() if not v > 0]
        non_negative = {
            "pretrain.steps": self.pretrain.steps,
            "attack.eps": self.attack.eps,
            "attack.step_size": self.attack.step_size,
            "attack.steps": self.attack.steps,
            "attack.noise": self.attack.noise,
            "optim.momentum": self.optim.momentum,
            "validation.collapse_drop": self.validation.collapse_drop,
            "objective.unroll": self.objective.unroll,
            "objective.trades_beta": self.objective.trades_beta,
            "objective.jacobian_weight": self.objective.jacobian_weight,
            "data.val_size": self.data.val_size,
            "validation.n_clean": self.validation.n_clean,
            "validation.n_robust": self.validation.n_robust,
            "validation.pgd_steps": self.validation.pgd_steps,
            "validation.selection_n": self.validation.selection_n,
            "optim.warmup_steps": self.optim.warmup_steps,
        }
        problems += [f"{k} must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
        if not 0 < self.objective.jacobian_fraction <= 1:
            problems.append(f"objective.jacobian_fraction must be in (0, 1], got {self.objective.jacobian_fraction}")
        if self.objective.attack_unroll is not None and self.objective.attack_unroll < 0:
            problems.append(f"objective.attack_unroll must be >= 0, got {self.objective.attack_unroll}")
        if not 0 < self.objective.tau <= 1:
            problems.append(f"objective.tau must be in (0, 1], got {self.objective.tau}")
        if self.attack.eps > 1 or self.validation.eps > 1:
            problems.append("eps is on the [0, 1] pixel scale: write 8/255, not 8")
        if self.data.train_subset is not None and self.data.train_subset < self.optim.batch_size:
            problems.append(f"data.train_subset ({self.data.train_subset}) is smaller than one batch")
        if self.data.epoch_size is not None and self.data.epoch_size < self.optim.batch_size:
            problems.append(f"data.epoch_size ({self.data.epoch_size}) is smaller than one batch")
        problems += self._data_problems()
        if problems:
            raise ValueError("invalid training config:\n  " + "\n  ".join(problems))

    def _data_problems(self) -> List[str]:
        d, problems = self.data, []
        if d.source == IMAGEFOLDER:
            if not d.root:
                problems.append("data.root must name the image folder when data.source is imagefolder")
            if not 8 <= d.input_size <= 1024:
                problems.append(f"data.input_size must be between 8 and 1024 pixels, got {d.input_size}")
            if d.on_bad_file not in ("skip", "fail"):
                problems.append(f"data.on_bad_file must be one of skip, fail, got {d.on_bad_file!r}")
            if not (0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
                problems.append("data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1")
            for key in ("mean", "std"):
                v = getattr(d, key)
                if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
                    problems.append(f"data.{key} must hold 3 per-channel values" + (" > 0" if key == "std" else ""))
            if d.workers < 0:
                problems.append(f"data.workers must be >= 0, got {d.workers}")
        elif d.root is not None or d.input_size != 32:
            problems.append("data.root and data.input_size apply to data.source=imagefolder (CIFAR-10 is 32x32)")
        return problems


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    ann = str(annotation)
    value = parse_number(value)
    if value is None:
        if "Optional" in ann or ann.startswith("Dict") or "None" in ann:
            return None
        raise ValueError(f"{where} may not be null")
    if ann in ("float", "Optional[float]"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if ann in ("int", "Optional[int]"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if ann == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if ann in ("str", "Optional[str]"):
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    if ann.startswith("Dict"):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, raw: Dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        if dataclasses.is_dataclass(f.default_factory):  # a nested section
            kwargs[name] = _build(f.default_factory, raw[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(raw[name], f.type, prefix + name)
    return cls(**kwargs)


def apply_overrides(raw: Dict[str, Any], assignments: Iterable[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` assignments (values parsed as YAML) to a raw config dict."""
    raw = _deep_copy(raw)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _read_yaml(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    """A config file; ``extends: base.yaml`` (relative to the file) merges a base under it."""
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of config sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = _deep_copy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _deep_copy(v)
    return out


def load_config(path: Union[str, Path, None], overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        raw.setdefault("name", path.stem)
    return TrainConfig.from_dict(apply_overrides(raw, overrides))


def config_diff(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two config dicts."""
    out: List[str] = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "overrides":
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
