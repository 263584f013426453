"""What the load test sends and what it accepts back.

* ``PayloadSet``: real CIFAR-10 test images as PNG bodies, each with the label the library
  predicts in-process for every request type (plain, and each defended T_f/R setting).
  Images whose top-1 / top-2 logit margin is below ``margin`` in any setting are left out:
  there, the float reordering of another batch size (or ONNX Runtime instead of PyTorch)
  may flip the answer legitimately, and the load test checks correctness, not ties.
* ``check_answer``: a response counts as a failure unless it is HTTP 200, JSON of the
  documented shape, reports the requested defense, and carries the expected label;
  ``check_oip_answer`` is the same check for an OIP v2 answer (``--protocol oip``).
* ``Stage``: one step of a load shape (duration, users, user class, optional paced rate).
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DefendedSetting",
    "PayloadSet",
    "Stage",
    "build_payloads",
    "check_answer",
    "check_oip_answer",
    "oip_request",
    "PROTOCOLS",
    "DEFAULT_DEFENDED_SETTINGS",
    "ENV",
]

# environment variables the locustfile reads (set by ``robustdeq loadtest``)
ENV = {
    "payloads": "ROBUSTDEQ_PAYLOADS",  # JSON written by PayloadSet.save
    "stages": "ROBUSTDEQ_STAGES",  # JSON list of Stage dicts
    "samples": "ROBUSTDEQ_SAMPLES",  # CSV of every request (exact percentiles)
    "model": "ROBUSTDEQ_MODEL",
    "token": "ROBUSTDEQ_TOKEN",
    "run_dir": "ROBUSTDEQ_RUN_DIR",
    "defended": "ROBUSTDEQ_DEFENDED_SETTINGS",  # e.g. "2:10,1:5,4:20"
    "mixed_fraction": "ROBUSTDEQ_DEFENDED_FRACTION",  # share of defended requests of MixedUser
    "protocol": "ROBUSTDEQ_PROTOCOL",  # one of PROTOCOLS
}
#: what a load-test request speaks: the project's own body (a PNG to /predictions/<model>, TorchServe
#: only) or OIP v2 JSON (a BYTES image to /v2/models/<model>/infer, either runtime)
PROTOCOLS = ("own", "oip")


@dataclass(frozen=True)
class DefendedSetting:
    """A defended request type: Algorithm 1 of paper 1 with this T_f and R (beta, eps default)."""

    T_f: int
    R: int

    @property
    def name(self) -> str:
        return f"defended T_f={self.T_f} R={self.R}"

    @property
    def key(self) -> str:
        return f"T{self.T_f}R{self.R}"

    @classmethod
    def parse_list(cls, text: str) -> List["DefendedSetting"]:
        """``"2:10,1:5"`` -> settings; a clear error for anything else."""
        out = []
        for item in (t.strip() for t in text.split(",") if t.strip()):
            try:
                t_f, r = (int(v) for v in item.split(":"))
            except ValueError:
                raise ValueError(f"defended setting {item!r} is not T_f:R (e.g. 2:10)") from None
            if t_f < 1 or r < 0:
                raise ValueError(f"defended setting {item!r}: T_f must be >= 1 and R >= 0")
            out.append(cls(t_f, r))
        if not out:
            raise ValueError("no defended settings given")
        return out


DEFAULT_DEFENDED_SETTINGS = (DefendedSetting(2, 10), DefendedSetting(1, 5), DefendedSetting(4, 20))
PLAIN = "plain"


@dataclass
class PayloadSet:
    """PNG bodies with the expected class index per request type (``plain``, ``T2R10``, ...)."""

    model: str
    pngs: List[bytes]
    expected: Dict[str, List[int]]
    test_indices: List[int] = field(default_factory=list)
    dropped_near_ties: int = 0

    def __len__(self) -> int:
        return len(self.pngs)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        data = asdict(self)
        data["pngs"] = [base64.b64encode(p).decode() for p in self.pngs]
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PayloadSet":
        data = json.loads(Path(path).read_text())
        data["pngs"] = [base64.b64decode(p) for p in data["pngs"]]
        return cls(**data)


def _png(image_chw_uint8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_chw_uint8.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def build_payloads(
    checkpoint: Union[str, Path],
    model_name: str,
    n: int = 64,
    settings: Sequence[DefendedSetting] = DEFAULT_DEFENDED_SETTINGS,
    margin: float = 1e-3,
    seed: int = 0,
    data: Optional[str] = None,
) -> PayloadSet:
    """``n`` random CIFAR-10 test images (seeded), labelled by the library in-process at the
    checkpoint's early state, plain and under each defended setting (paper 1, Algorithm 1)."""
    import torch

    from ..checkpoint import load_checkpoint
    from ..data import load_cifar10
    from ..defense import entropy_reduction

    model = load_checkpoint(checkpoint).build_model()
    k = model.readout_index()
    test = load_cifar10("test", source=data, progress=False)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[: max(2 * n, n + 32)]
    x = test.float_images(order)
    with torch.no_grad():
        logits = {PLAIN: model.trajectory(x).logits(k)}
    for s in settings:
        logits[s.key] = entropy_reduction(model, x, T_f=s.T_f, R=s.R, with_plain=False).trajectory.logits(k)
    keep = torch.ones(len(order), dtype=torch.bool)
    for value in logits.values():
        top2 = value.topk(2, dim=1).values
        keep &= (top2[:, 0] - top2[:, 1]) >= margin
    chosen = keep.nonzero().squeeze(1)[:n]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} of {len(order)} images clear the label margin {margin}")
    images = test.images[order[chosen]]
    return PayloadSet(
        model=model_name,
        pngs=[_png(img) for img in images],
        expected={key: value[chosen].argmax(1).tolist() for key, value in logits.items()},
        test_indices=order[chosen].tolist(),
        dropped_near_ties=int((~keep[: int(chosen[-1]) + 1]).sum()),
    )


def check_answer(status: int, text: str, expected: int, setting: Optional[DefendedSetting] = None) -> Optional[str]:
    """None when the response is right; otherwise why it is a failure (shown by Locust)."""
    if status != 200:
        return f"HTTP {status}: {text[:200]}"
    try:
        answer = json.loads(text)
    except ValueError:
        return "the response is not JSON"
    if not isinstance(answer, dict):
        return f"the response is a {type(answer).__name__}, not an object"
    shape: Tuple[Tuple[str, Any], ...] = (("index", int), ("label", str), ("top_k", list), ("defense", dict))
    for key, kind in shape:
        if not isinstance(answer.get(key), kind) or isinstance(answer.get(key), bool):
            return f"the response has no {kind.__name__} {key!r}"
    if not answer["top_k"] or answer["top_k"][0].get("index") != answer["index"]:
        return "top_k does not start with the answer"
    defense = answer["defense"]
    if setting is None:
        if defense.get("mode") != "off" or defense.get("ran"):
            return f"a plain request was defended: {defense}"
    elif (defense.get("mode"), defense.get("T_f"), defense.get("R")) != ("on", setting.T_f, setting.R) or (
        bool(defense.get("ran")) != (setting.R > 0)
    ):
        return f"defense {defense} is not the requested T_f={setting.T_f} R={setting.R}"
    if answer["index"] != expected:
        return f"label {answer['index']} ({answer['label']}) where the library says {expected}"
    return None


def oip_request(png_b64: str, setting: Optional[DefendedSetting] = None) -> Dict[str, Any]:
    """The OIP v2 body of one load-test request: one BYTES image, the defense as parameters."""
    body: Dict[str, Any] = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png_b64]}]}
    if setting is not None:
        body["parameters"] = {"defense": "on", "T_f": setting.T_f, "R": setting.R}
    return body


def check_oip_answer(status: int, text: str, expected: int, setting: Optional[DefendedSetting] = None) -> Optional[str]:
    """:func:`check_answer` for an OIP v2 answer: its ``index`` output, ``defense_ran`` and the
    setting in its ``parameters``."""
    if status != 200:
        return f"HTTP {status}: {text[:200]}"
    try:
        answer = json.loads(text)
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        params = answer["parameters"]
        index, ran = outputs["index"], outputs["defense_ran"]
    except (ValueError, KeyError, TypeError):
        return f"not an OIP v2 answer with 'index' and 'defense_ran' outputs: {text[:200]}"
    if setting is None:
        if params.get("defense") != "off" or ran != [False]:
            return f"a plain request was defended: {params}, defense_ran {ran}"
    elif (params.get("defense"), params.get("T_f"), params.get("R")) != ("on", setting.T_f, setting.R) or ran != [
        setting.R > 0
    ]:
        return f"defense {params} (ran {ran}) is not the requested T_f={setting.T_f} R={setting.R}"
    if index != [expected]:
        return f"label {index} where the library says {expected}"
    return None


@dataclass
class Stage:
    """One step of a load shape: ``users`` of class ``user`` for ``duration`` seconds, each
    paced to ``rate / users`` requests per second (``rate`` None: as fast as answers come);
    optionally ``also_users`` of a second class beside them, paced to ``also_rate`` in all."""

    duration: float
    users: int
    user: str = "PlainUser"
    rate: Optional[float] = None
    also_user: Optional[str] = None
    also_users: int = 0
    also_rate: Optional[float] = None

    def __post_init__(self):
        if self.duration <= 0 or self.users < 1:
            raise ValueError(f"a stage needs a positive duration and at least one user: {self}")
        for rate in (self.rate, self.also_rate):
            if rate is not None and (not math.isfinite(rate) or rate <= 0):
                raise ValueError(f"a stage's rates must be positive: {self}")
        if (self.also_user is None) != (self.also_users == 0):
            raise ValueError(f"also_user and also_users go together: {self}")

    @property
    def classes(self) -> Dict[str, int]:
        """User class name -> number of users in this stage."""
        out = {self.user: self.users}
        if self.also_user:
            out[self.also_user] = out.get(self.also_user, 0) + self.also_users
        return out

    @property
    def total_users(self) -> int:
        return self.users + self.also_users

    def per_user_rate(self, user_class: str) -> Optional[float]:
        """Requests per second each user of ``user_class`` is paced to (None: unpaced)."""
        if user_class == self.also_user:
            return None if self.also_rate is None else self.also_rate / self.also_users
        return None if self.rate is None else self.rate / self.users

    @staticmethod
    def dump(stages: Sequence["Stage"]) -> str:
        return json.dumps([asdict(s) for s in stages])

    @classmethod
    def load_list(cls, text: str) -> List["Stage"]:
        return [cls(**item) for item in json.loads(text)]
