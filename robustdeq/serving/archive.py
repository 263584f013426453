"""``robustdeq archive``: TorchServe model archives (.mar) from a checkpoint, reproducibly.

One checkpoint becomes two archives, one per *lane* (plain and defended traffic never
share a batch, because a batch finishes with its slowest item):

* ``NAME.mar``: the plain lane (defense off; large batches, short delay and timeout);
* ``NAME-defended.mar``: the defended lane (Algorithm 1 on / gated; small batches, a
  timeout that covers the worst request the bounds allow).

Each holds the checkpoint, the handler, ``model-config.yaml`` (TorchServe's batching
settings plus the handler's defaults and bounds), the robustness card and the label
names. ``torch-model-archiver`` builds the zip; it is then rewritten with sorted entries,
fixed timestamps and permissions and a fixed ``createdOn``, so the same inputs give the
same bytes (``make archives`` rebuilds the shipped ones and a test compares them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .. import __version__
from ..card import CARD_FILE, card_for_checkpoint, load_card
from ..checkpoint import file_sha256, load_checkpoint
from ..data import PROJECT_ROOT
from ..executables import find_executable
from ..export import export_onnx
from ..project_paths import MODEL_STORE
from .options import Limits

DEFAULT_HANDLER = PROJECT_ROOT / "handlers" / "robustdeq_handler.py"
DEFAULT_STORE = MODEL_STORE
DEFENDED_SUFFIX = "-defended"
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
FIXED_CREATED_ON = "01/01/1980 00:00:00"
LANES = ("plain", "defended")
_TRAINED = PROJECT_ROOT / "training" / "shipped"
#: the archives shipped in model_store/ (``make archives``): endpoint name -> checkpoint.
#: deq-small is the long-trained default recipe (9.1 CPU-hours), lyadeq-small the LyaDEQ of its
#: size and recipe (docs/results.md); the tiny ones were trained for about 25 CPU-minutes.
SHIPPED = {
    "deq-small": _TRAINED / "deq-small-nfgsm-rs-long" / "model.pt",
    "lyadeq-small": _TRAINED / "lyadeq-small-nfgsm-rs" / "model.pt",
    "deq-tiny": _TRAINED / "deq-tiny-trades-rs" / "model.pt",
    "lyadeq-tiny": _TRAINED / "lyadeq-tiny-trades" / "model.pt",
}

__all__ = [
    "LaneConfig",
    "LANE_DEFAULTS",
    "parse_lane_config",
    "SHIPPED",
    "SHIPPED_LANES",
    "build_archives",
    "build_shipped",
    "archive_name",
    "read_model_config",
    "DEFENDED_SUFFIX",
]


@dataclass(frozen=True)
class LaneConfig:
    """TorchServe's per-model batching settings for one lane (model-config.yaml top level)."""

    batch_size: int
    max_batch_delay_ms: int
    response_timeout_s: int
    workers: int = 1

    def to_yaml(self) -> Dict[str, Any]:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
        }


#: The defended timeout covers the worst request the hard bounds allow with a wide margin:
#: T_f = 1, R = 50 on a full batch of 4 took 1.7 s for deq-tiny, 3.2 s for deq-small and 7.1 s
#: for lyadeq-tiny on one CPU thread here (``robustdeq bench --batch-size 4 --T_f 1 --R 0 50``).
#: Bigger models on a CPU need their own (:data:`SHIPPED_LANES`, ``robustdeq archive --defended-lane``).
#: Two plain workers of one thread each: on this 2-core machine one worker saturated at 0.55-0.6x
#: of the in-process handler (it can only ever use one core); two reached 0.9x of the handler
#: given both cores (docs/performance.md, "Workers and priorities").
LANE_DEFAULTS = {
    "plain": LaneConfig(batch_size=16, max_batch_delay_ms=5, response_timeout_s=30, workers=2),
    "defended": LaneConfig(batch_size=4, max_batch_delay_ms=10, response_timeout_s=60),
}

#: Shipped models whose lanes differ from :data:`LANE_DEFAULTS`: lyadeq-small's worst defended
#: batch (T_f = 1, R = 50, 4 images) took 28.4 s on one thread here, so its timeout is 120 s.
SHIPPED_LANES = {"lyadeq-small": {"defended": LaneConfig(batch_size=4, max_batch_delay_ms=10, response_timeout_s=120)}}

#: Handler defaults per lane: the defended worker runs at niceness 10, so that a burst of
#: Algorithm 1 requests takes only the CPU the plain lane leaves idle (the isolation target).
LANE_HANDLER_DEFAULTS = {"plain": {}, "defended": {"cpu_nice": 10}}


def parse_lane_config(text: str, lane: Optional[str] = None) -> LaneConfig:
    """``BATCH,DELAY_MS,TIMEOUT_S[,WORKERS]`` (e.g. ``4,10,60``); without WORKERS, the default
    of ``lane`` (:data:`LANE_DEFAULTS`), or 1 when no lane is named."""
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) == 3 and lane is not None:
            values.append(LANE_DEFAULTS[lane].workers)
        config = LaneConfig(*values)
    except (TypeError, ValueError):
        raise ValueError(f"lane setting {text!r}: expected BATCH,DELAY_MS,TIMEOUT_S[,WORKERS] as integers") from None
    c = config
    if c.batch_size < 1 or c.max_batch_delay_ms < 0 or c.response_timeout_s < 1 or c.workers < 1:
        raise ValueError(f"lane setting {text!r}: batch, timeout and workers must be >= 1, the delay >= 0")
    return config


def archive_name(name: str, lane: str) -> str:
    return name + (DEFENDED_SUFFIX if lane == "defended" else "")


def model_config(lane_config: LaneConfig, limits: Limits) -> Dict[str, Any]:
    handler = {"checkpoint": "model.pt", "card": CARD_FILE, "labels": "index_to_name.json"}
    handler["library_version"] = __version__
    handler.update(limits.to_dict())
    return {**lane_config.to_yaml(), "handler": handler}


def build_archives(
    checkpoint: Path,
    name: str,
    out_dir: Path = DEFAULT_STORE,
    card: Optional[Path] = None,
    lanes: tuple = LANES,
    handler: Path = DEFAULT_HANDLER,
    lane_configs: Optional[Dict[str, LaneConfig]] = None,
    defaults: Optional[Dict[str, Any]] = None,
    onnx: bool = True,
) -> List[Path]:
    """Build one deterministic .mar per lane into ``out_dir``; returns their paths.

    ``defaults`` overrides handler defaults/bounds (``T_f``, ``R``, ``max_R``, ...) for both lanes.
    With ``onnx`` the plain lane also carries ``model.onnx`` (``robustdeq.export``) and answers
    through ONNX Runtime, when the model can be exported (not LyaDEQ).
    """
    checkpoint, handler, out_dir = Path(checkpoint), Path(handler), Path(out_dir)
    ckpt = load_checkpoint(checkpoint)  # refuses unsafe or corrupt files before anything is built
    model = ckpt.build_model()
    exportable = onnx and not model.onnx_export_blocker
    if not handler.is_file():
        raise FileNotFoundError(f"handler {handler} does not exist")
    card_path = card_for_checkpoint(checkpoint, card)
    if card_path is not None:
        card_data = load_card(card_path)  # validated
        expected = card_data.get("checkpoint_sha256")
        if expected and expected != file_sha256(checkpoint):
            raise ValueError(f"robustness card {card_path} describes another checkpoint (sha256 {expected[:12]}...)")
    unknown = set(lanes) - set(LANES)
    if unknown:
        raise ValueError(f"unknown lane(s) {sorted(unknown)}; lanes are {LANES}")
    lane_configs = {**LANE_DEFAULTS, **(lane_configs or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for lane in lanes:
        limits = Limits.from_config(
            {**LANE_HANDLER_DEFAULTS[lane], **(defaults or {}), "lane": lane,
             "default_defense": "on" if lane == "defended" else "off"}
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="robustdeq-archive-") as tmp:
            tmp = Path(tmp)
            shutil.copyfile(checkpoint, tmp / "model.pt")
            labels = {str(i): label for i, label in enumerate(model.class_names)}  # the checkpoint's classes
            (tmp / "index_to_name.json").write_text(json.dumps(labels, indent=1) + "\n")
            extra = [tmp / "index_to_name.json"]
            if card_path is not None:
                shutil.copyfile(card_path, tmp / CARD_FILE)
                extra.append(tmp / CARD_FILE)
            config = model_config(lane_configs[lane], limits)
            if lane == "plain" and exportable:
                export_onnx(model, tmp / "model.onnx")
                extra.append(tmp / "model.onnx")
                config["handler"]["onnx"] = "model.onnx"
            header = f"# RobustDEQ archive {archive_name(name, lane)}: {lane} lane of {ckpt.model_name}\n"
            (tmp / "model-config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=True))
            shutil.copyfile(handler, tmp / handler.name)
            target = archive_name(name, lane)
            cmd = [
                find_executable("torch-model-archiver", "pip install torch-model-archiver==0.12.0"),
                "--model-name", target,
                "--version", __version__,
                "--serialized-file", str(tmp / "model.pt"),
                "--handler", str(tmp / handler.name),
                "--extra-files", ",".join(str(p) for p in extra),
                "--config-file", str(tmp / "model-config.yaml"),
                "--export-path", str(tmp),
                "--force",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"torch-model-archiver failed for {target}: {proc.stderr.strip() or proc.stdout}")
            out = out_dir / f"{target}.mar"
            _normalise_zip(tmp / f"{target}.mar", out)
            built.append(out)
    return built


def read_model_config(archive: Path) -> Dict[str, Any]:
    """The ``model-config.yaml`` inside a ``.mar`` (batching, workers, the handler section)."""
    with zipfile.ZipFile(archive) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def _normalise_zip(src: Path, dst: Path) -> None:
    """Rewrite a zip with sorted entries, fixed dates and modes, and a fixed ``createdOn``."""
    with zipfile.ZipFile(src) as zin:
        entries = {info.filename: zin.read(info.filename) for info in zin.infolist() if not info.is_dir()}
    manifest = "MAR-INF/MANIFEST.json"
    if manifest in entries:
        data = json.loads(entries[manifest])
        data["createdOn"] = FIXED_CREATED_ON
        entries[manifest] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    tmp = dst.with_name(f".{dst.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as zout:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
            info.compress_type = zipfile.ZIP_STORED  # no zlib version in the bytes
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zout.writestr(info, entries[name])
    tmp.replace(dst)


def build_shipped(
    out_dir: Path = DEFAULT_STORE, lane_configs: Optional[Dict[str, LaneConfig]] = None, **kwargs
) -> List[Path]:
    """Every :data:`SHIPPED` model's archives (``make archives``): each model's own lane settings
    (:data:`SHIPPED_LANES`) under ``lane_configs``; the other keywords go to :func:`build_archives`."""
    built = []
    for name, checkpoint in SHIPPED.items():
        lanes_of_model = {**SHIPPED_LANES.get(name, {}), **(lane_configs or {})}
        built += build_archives(checkpoint, name, out_dir, lane_configs=lanes_of_model, **kwargs)
    return built
