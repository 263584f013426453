"""A small HTTP client for a RobustDEQ server (standard library only).

It reads the server's address and inference token from the run folder that
``robustdeq serve`` wrote (``server.json`` and TorchServe's ``key_file.json``), or takes
them explicitly (``ROBUSTDEQ_URL`` / ``ROBUSTDEQ_TOKEN``). Requests with the defense on
or gated go to the model's ``-defended`` endpoint automatically.
"""

from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .archive import DEFENDED_SUFFIX
from .runfolder import DEFAULT_RUN_DIR, ServerError, read_keys, read_server_info

__all__ = ["Client", "endpoint_for"]


def endpoint_for(model: str, defense: Optional[str]) -> str:
    """The registration that serves ``defense``: the plain lane or the ``-defended`` one."""
    if defense in (None, "off") or model.endswith(DEFENDED_SUFFIX):
        return model
    return model + DEFENDED_SUFFIX


@dataclass
class Client:
    url: str
    token: Optional[str] = None
    timeout: float = 120.0

    @classmethod
    def from_run_dir(cls, run_dir: Path = DEFAULT_RUN_DIR, **kwargs) -> "Client":
        """Address and token from a run folder, overridden by ``ROBUSTDEQ_URL`` / ``ROBUSTDEQ_TOKEN``."""
        url, token = os.environ.get("ROBUSTDEQ_URL"), os.environ.get("ROBUSTDEQ_TOKEN")
        if url is None or token is None:
            info = read_server_info(Path(run_dir))
            if info is None:
                raise ServerError(
                    f"no server.json in {Path(run_dir).resolve()}: start one with `robustdeq serve`, or set "
                    "ROBUSTDEQ_URL and ROBUSTDEQ_TOKEN"
                )
            url = url or info.inference_url
            token = token or read_keys(Path(run_dir))["inference"]
        return cls(url=url, token=token, **kwargs)

    def request(
        self, path: str, body: bytes = b"", content_type: str = "application/octet-stream", headers=None
    ) -> Tuple[int, Dict[str, Any]]:
        """POST ``body`` to ``path`` -> (HTTP status, decoded JSON or {"error": text})."""
        head = {"Content-Type": content_type, **(headers or {})}
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url.rstrip("/") + path, data=body, headers=head, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError) as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {"error": raw.decode("utf-8", "replace")}

    def predict(self, model: str, image: bytes, content_type: str = "image/png", **options) -> Tuple[int, dict]:
        """Classify image bytes; ``options`` are the request options (``defense``, ``T_f``, ``R``, ...)."""
        headers = {"X-" + k.replace("_", "-"): str(v) for k, v in options.items() if v is not None}
        target = endpoint_for(model, options.get("defense"))
        return self.request(f"/predictions/{target}", image, content_type, headers)

    def predict_file(self, model: str, path: Path, **options) -> Tuple[int, dict]:
        path = Path(path)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return self.predict(model, path.read_bytes(), content_type, **options)

    def predict_json(self, model: str, body: Dict[str, Any]) -> Tuple[int, dict]:
        """Send a JSON body (``{"image": base64}`` or ``{"array": ...}`` plus options)."""
        target = endpoint_for(model, body.get("defense"))
        return self.request(f"/predictions/{target}", json.dumps(body).encode(), "application/json")

    def describe(self, model: str) -> Tuple[int, dict]:
        """The model's defaults, bounds and robustness card (inference token suffices)."""
        return self.predict_json(model, {"describe": True})


def summarise(path: str, status: int, answer: Dict[str, Any]) -> str:
    """One human-readable paragraph for ``robustdeq predict``."""
    if status != 200:
        return f"{path}: HTTP {status} {answer.get('reason', '')}: {answer.get('error', answer)}"
    top = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in answer["top_k"])
    lines = [
        f"{path}: {answer['label']}  (top: {top})",
        f"  state z[{answer['state']}] of {answer['n_steps']}, entropy {answer['entropy']:.3f} nats, "
        f"residual {answer['residual']:.3g}"
        + ("  [high entropy: likely perturbed]" * bool(answer.get("high_entropy"))),
    ]
    d = answer["defense"]
    if d["mode"] != "off":
        if d["ran"]:
            lines.append(
                f"  defense {d['mode']} (T_f={d['T_f']}, R={d['R']}): entropy {d['entropy_before']:.3f} -> "
                f"{answer['entropy']:.3f}, input moved {d['perturbation_linf_255']:.1f}/255"
            )
        else:
            lines.append(f"  defense {d['mode']}: not triggered (entropy under the gate threshold)")
    t = answer["timing_ms"]
    lines.append(
        f"  time: solve {t['solve']:.1f} ms ({t.get('backend', 'torch')}), defense {t['defense']:.1f} ms "
        f"(batch of {t['batch_size']})"
    )
    card = answer.get("robustness")
    if card:
        robust = card["robust"]["acc"] * 100 if card.get("robust") else float("nan")
        clean = card["clean"]["acc"] * 100 if card.get("clean") else float("nan")
        lines.append(
            f"  robustness card ({card['name']}): clean {clean:.1f}%, robust {robust:.1f}% ({card['robust_kind']}), "
            f"cost {card['cost_vs_plain']:.1f}x plain"
        )
    return "\n".join(lines)
