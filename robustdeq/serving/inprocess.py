"""A TorchServe worker's work without the server: an archive's handler driven in-process.

``InProcessWorker`` extracts a ``.mar``, builds TorchServe's own ``Context`` (with the YAML
metrics cache) and loads the archive's handler file, then answers batches through
``ts.service.Service.retrieve_data_for_inference``, exactly as a worker process does after
it has read a batch from its socket. The handler tests use it, and the load test uses it
for the in-process throughput that the server's throughput is compared with (the server
adds the frontend, the socket hop and HTTP).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..data import PROJECT_ROOT

DEFAULT_METRICS_YAML = PROJECT_ROOT / "serving" / "metrics.yaml"

__all__ = ["InProcessWorker", "make_request"]


def make_request(req_id: str, body: Any, content_type: str, headers: Optional[Dict[str, str]] = None) -> dict:
    """One request as the frontend hands it to a worker: raw bytes (``robustdeq serve`` sets
    ``TS_DECODE_INPUT_REQUEST=false``, so JSON bodies arrive undecoded too), or an already
    decoded JSON value, as TorchServe's default decoding would pass it."""
    head = [{"name": k.encode(), "value": str(v).encode()} for k, v in (headers or {}).items()]
    return {
        "requestId": req_id.encode(),
        "headers": head,
        "parameters": [{"name": "body", "contentType": content_type, "value": body}],
    }


class InProcessWorker:
    """An archive's handler, initialised with TorchServe's ``Context`` in this process."""

    def __init__(
        self,
        archive: Union[str, Path],
        workdir: Optional[Union[str, Path]] = None,
        metrics_yaml: Union[str, Path] = DEFAULT_METRICS_YAML,
        handler_overrides: Optional[Dict[str, Any]] = None,
    ):
        """``handler_overrides`` replace settings of the archive's ``handler`` section. The
        archive's ``cpu_nice`` is always dropped: it belongs to a worker process, not to the
        process that drives this one."""
        import yaml
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        archive = Path(archive)
        self.name = archive.stem
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"rdeq-{self.name}-")
            workdir = self._tmp.name
        self.model_dir = Path(workdir)
        with zipfile.ZipFile(archive) as z:
            z.extractall(self.model_dir)
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        self.config = yaml.safe_load((self.model_dir / "model-config.yaml").read_text())
        section = self.config.setdefault("handler", {})
        section.pop("cpu_nice", None)
        section.update(handler_overrides or {})
        self.batch_size = int(self.config.get("batchSize", 1))
        metrics = MetricsCacheYamlImpl(str(metrics_yaml))
        metrics.initialize_cache()
        self.context = Context(
            self.name, str(self.model_dir), manifest, self.batch_size, None, "0.12.0", metrics=metrics
        )
        self.context.model_yaml_config = self.config
        handler_file = self.model_dir / manifest["model"]["handler"]
        spec = importlib.util.spec_from_file_location(f"robustdeq_handler_{self.name.replace('-', '_')}", handler_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.handler = module.RobustDEQHandler()
        self.handler.initialize(self.context)

    @property
    def engine(self):
        return self.handler.engine

    def handle(self, batch: Sequence[dict]) -> List[Tuple[int, Any]]:
        """Answer a batch of ``make_request`` dicts -> [(HTTP status, decoded JSON answer)]."""
        from ts.service import Service

        processors, inputs, req_ids = Service.retrieve_data_for_inference(list(batch))
        self.context.request_processor = processors
        self.context.request_ids = req_ids
        self.context.metrics.request_ids = req_ids
        out = self.handler.handle(inputs, self.context)
        return [(self.context.get_response_status(i)[0], json.loads(o)) for i, o in enumerate(out)]
