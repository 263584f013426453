"""Per-request options of the serving API, their defaults, and their hard bounds.

A request may set, in its JSON body or in ``X-<Option>`` headers (the body wins):

* ``state``: the early state z[k] to read the prediction from (paper 1, Sec. 4);
  1..N or a negative index (-1 is z[N]); default: the checkpoint's chosen state;
* ``defense``: ``off``, ``on`` (Algorithm 1 of paper 1) or ``gated`` (Algorithm 1 only
  when the plain entropy at the readout state exceeds the card's threshold);
* ``T_f``, ``R``, ``beta``, ``eps``: Algorithm 1's settings (beta and eps in pixel units
  of [0, 1] images; ``8/255`` style fractions are accepted);
* ``top_k``: how many classes to return with their probabilities.

The bounds are hard: one request cannot ask for more work than ``max_R`` entropy steps
every ``T_f >= 1`` solver steps. An archive may narrow them in its ``model-config.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

from ..defense_defaults import DEFAULT_BETA, DEFAULT_EPS, DEFAULT_R, DEFAULT_T_F
from ..number_parsing import parse_number

DEFENSE_MODES = ("off", "on", "gated")
#: hard upper bounds no archive can raise
HARD_MAX_R = 50
HARD_MAX_EPS = 32 / 255
HARD_MAX_BETA = 16 / 255
HARD_MAX_TOP_K = 10
#: the option names a request may use (JSON keys; headers are ``X-`` + name, any case)
OPTION_NAMES = ("state", "defense", "T_f", "R", "beta", "eps", "top_k")
#: JSON keys that carry the input rather than options
PAYLOAD_KEYS = ("image", "array")
#: a JSON body ``{"describe": true}`` returns the card and the options instead of a prediction
DESCRIBE_KEY = "describe"

__all__ = [
    "DEFENSE_MODES",
    "OPTION_NAMES",
    "PAYLOAD_KEYS",
    "DESCRIBE_KEY",
    "RequestError",
    "Limits",
    "RequestOptions",
    "parse_options",
    "header_options",
]


class RequestError(ValueError):
    """A problem with one request: an HTTP status (4xx for the client's mistakes, 500 when
    the model failed on it), a short machine-readable reason (the label of the rejection
    metric) and a message that names the problem."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = int(status), reason, message

    def to_dict(self) -> Dict[str, Any]:
        return {"error": self.message, "reason": self.reason, "status": self.status}


@dataclass(frozen=True)
class Limits:
    """Defaults and bounds of one archive (the ``handler`` section of model-config.yaml)."""

    lane: str = "plain"  # "plain": defense off only; "defended": every mode
    default_defense: str = "off"
    T_f: int = DEFAULT_T_F
    R: int = DEFAULT_R
    beta: float = DEFAULT_BETA
    eps: float = DEFAULT_EPS
    top_k: int = 3
    max_R: int = HARD_MAX_R
    max_eps: float = HARD_MAX_EPS
    max_beta: float = HARD_MAX_BETA
    max_image_side: int = 4096  # inputs.MAX_IMAGE_SIDE
    max_image_pixels: int = 4096 * 4096  # inputs.MAX_IMAGE_PIXELS: bounds a worker's decode memory
    torch_threads: int = 1
    #: the worker process's CPU niceness (0..19): the defended lane yields the cores to the plain lane
    cpu_nice: int = 0

    @classmethod
    def from_config(cls, section: Optional[Mapping[str, Any]]) -> "Limits":
        """Build from a config mapping; unknown keys and values beyond the hard bounds are errors."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown handler setting(s) {unknown}; known: {sorted(known)}")
        values = {}
        for f in fields(cls):
            if f.name in section:
                value = parse_number(section[f.name])
                values[f.name] = value if f.type == "str" else (int(value) if f.type == "int" else float(value))
        limits = cls(**values)
        limits.validate()
        return limits

    def validate(self) -> None:
        if self.lane not in ("plain", "defended"):
            raise ValueError(f"lane must be 'plain' or 'defended', got {self.lane!r}")
        if self.default_defense not in DEFENSE_MODES:
            raise ValueError(f"default_defense must be one of {DEFENSE_MODES}, got {self.default_defense!r}")
        if self.lane == "plain" and self.default_defense != "off":
            raise ValueError("a plain lane serves defense 'off' only")
        if not 0 <= self.max_R <= HARD_MAX_R:
            raise ValueError(f"max_R must be in 0..{HARD_MAX_R}")
        if not 0 <= self.max_eps <= HARD_MAX_EPS or not 0 <= self.max_beta <= HARD_MAX_BETA:
            raise ValueError("max_eps / max_beta exceed the hard bounds")
        if not (1 <= self.T_f and 0 <= self.R <= self.max_R and 0 <= self.eps <= self.max_eps):
            raise ValueError("the default T_f / R / eps lie outside the bounds")
        if not 0 <= self.beta <= self.max_beta or not 1 <= self.top_k <= HARD_MAX_TOP_K:
            raise ValueError("the default beta / top_k lie outside the bounds")
        if not 0 <= self.cpu_nice <= 19:
            raise ValueError(f"cpu_nice must be in 0..19 (a worker may only lower its priority), got {self.cpu_nice}")
        if not (1 <= self.max_image_side <= 4096 and 1 <= self.max_image_pixels <= 4096 * 4096):
            raise ValueError("max_image_side / max_image_pixels exceed the hard bounds (4096 a side, 4096x4096)")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RequestOptions:
    """The validated options of one request (``state`` as an index 0..N)."""

    state: int
    defense: str = "off"
    T_f: int = DEFAULT_T_F
    R: int = DEFAULT_R
    beta: float = DEFAULT_BETA
    eps: float = DEFAULT_EPS
    top_k: int = 3
    given: tuple = field(default=(), compare=False)  # the option names the request set itself

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.pop("given")
        return out


def header_options(headers: Mapping[str, Any]) -> Dict[str, Any]:
    """Options from ``X-<Option>`` headers, case-insensitive (``X-T-f``, ``x-t_f``, ``X-Top-K``).

    Other headers, ``X-Forwarded-For`` and the like, are not options and are ignored.
    """
    wanted = {("x-" + name).lower().replace("_", "-"): name for name in OPTION_NAMES}
    out = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, (str, bytes)):
            continue
        name = wanted.get(key.lower().replace("_", "-"))
        if name is not None:
            out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


def _number(name: str, value: Any, integer: bool) -> float:
    value = parse_number(value.strip() if isinstance(value, str) else value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise RequestError(400, "bad_option_value", f"option {name!r} must be {kind}, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise RequestError(400, "bad_option_value", f"option {name!r} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _bounded(name: str, value: float, lo: float, hi: float, why: str = "") -> None:
    if not lo <= value <= hi:
        raise RequestError(
            400, "option_out_of_bounds", f"option {name!r} = {value:g} is out of bounds [{lo:g}, {hi:g}]{why}"
        )


def parse_options(
    body: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits, n_steps: int, default_state: int
) -> RequestOptions:
    """Validate a request's options against ``limits`` for a model with ``n_steps`` solver steps.

    ``body`` holds the JSON body's keys other than the payload; ``headers`` the request headers.
    Raises :class:`RequestError` (400) naming the first problem found.
    """
    unknown = sorted(set(body) - set(OPTION_NAMES) - set(PAYLOAD_KEYS) - {DESCRIBE_KEY})
    if unknown:
        raise RequestError(400, "unknown_option", f"unknown option(s) {unknown}; known options: {list(OPTION_NAMES)}")
    raw = {**header_options(headers), **{k: v for k, v in body.items() if k in OPTION_NAMES}}
    opts = {"state": default_state, "defense": limits.default_defense}
    opts.update({name: getattr(limits, name) for name in ("T_f", "R", "beta", "eps", "top_k")})
    if "defense" in raw:
        mode = raw["defense"]
        mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
        mode = str(mode).strip().lower()
        if mode not in DEFENSE_MODES:
            raise RequestError(400, "bad_option_value", f"option 'defense' must be one of {list(DEFENSE_MODES)}")
        opts["defense"] = mode
    for name in ("state", "T_f", "R", "top_k"):
        if name in raw:
            opts[name] = _number(name, raw[name], integer=True)
    for name in ("beta", "eps"):
        if name in raw:
            opts[name] = _number(name, raw[name], integer=False)
    state = opts["state"]
    _bounded("state", state, -n_steps, n_steps, f" (z[1]..z[{n_steps}], or negative from the end)")
    if state == 0:
        raise RequestError(400, "option_out_of_bounds", "option 'state' = 0 is z[0] = 0, which carries no prediction")
    _bounded("T_f", opts["T_f"], 1, n_steps)
    _bounded("R", opts["R"], 0, limits.max_R)
    _bounded("beta", opts["beta"], 0.0, limits.max_beta)
    _bounded("eps", opts["eps"], 0.0, limits.max_eps)
    _bounded("top_k", opts["top_k"], 1, HARD_MAX_TOP_K)
    if limits.lane == "plain" and opts["defense"] != "off":
        raise RequestError(
            400,
            "wrong_lane",
            f"defense {opts['defense']!r} is served by the model's '-defended' endpoint; this endpoint is the plain "
            "lane (plain and defended requests never share a batch)",
        )
    opts["state"] = state % (n_steps + 1)
    return RequestOptions(given=tuple(sorted(raw)), **opts)
