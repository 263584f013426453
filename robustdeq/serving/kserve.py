"""``robustdeq kserve-layout``: the model storage a KServe ``InferenceService`` mounts at /mnt/models.

KServe's TorchServe integration expects this layout under the ``storageUri``::

    config/config.properties    TorchServe's configuration (model_snapshot names the models)
    config/metrics.yaml         the metric declarations (TorchServe drops undeclared metrics)
    config/log4j2.xml           every log to stdout (ours; the ServingRuntime passes --log-config)
    model-store/*.mar           the archives

``render_kserve_config`` derives ``config.properties`` from the same sources as the local
server: the hardened ``serving/config.properties`` (limits, metrics, no model API, no per-model
pip installs) and each archive's ``model-config.yaml`` (batching and workers, copied into
``model_snapshot``). What differs inside a pod: the inference and metrics listeners bind
0.0.0.0 (the Service and Prometheus reach the pod; the management API stays on loopback),
paths are under /mnt/models, and token authorization is off because TorchServe 0.12 draws new
random keys at every start, which no client of several replicas behind one Service could
know; authentication moves to the cluster edge (serving/k8s/README.md).
``serving/k8s/config.properties`` is the rendering for the shipped models; a test keeps the
two equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .. import __version__
from ..data import PROJECT_ROOT
from .archive import DEFAULT_STORE
from .runfolder import parse_properties
from .server import (
    DEFAULT_CONFIG,
    DEFAULT_METRICS,
    DEFAULT_MODELS,
    LOOPBACK,
    Ports,
    ServerError,
    allowed_urls,
    registrations_for,
)

KSERVE_ROOT = "/mnt/models"  # where KServe mounts the storageUri (PVC or storage-initializer download)
POD_BIND = "0.0.0.0"
KSERVE_PORTS = Ports()  # 8080 inference, 8081 management, 8082 metrics, 7070/7071 gRPC
K8S_DIR = PROJECT_ROOT / "serving" / "k8s"
COMMITTED_CONFIG = K8S_DIR / "config.properties"
PVC_NAME = "robustdeq-models"  # serving/k8s/pvc.yaml
PVC_SUBPATH = f"robustdeq-{__version__}"  # the folder of the PVC that inferenceservice.yaml's storageUri names
#: the per-model keys TorchServe's snapshot restore reads (SnapshotManager / Model.setModelState)
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")

# TorchServe's default log4j2.xml writes rolling files (100 MB x 5 per log and day) into the
# container; in a pod they would fill the scratch volume, so everything goes to stdout, which the
# kubelet rotates. Metrics are on the metrics port (prometheus mode), so the metric logs are off.
LOG4J2_XML = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- RobustDEQ Serve in a KServe pod: TorchServe logs to stdout only (written by robustdeq kserve-layout). -->
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="info"/>
    <Logger name="MODEL_LOG" level="info"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="info"/>
    <Root level="info">
      <AppenderRef ref="STDOUT"/>
    </Root>
  </Loggers>
</Configuration>
"""

__all__ = [
    "KSERVE_ROOT",
    "KSERVE_PORTS",
    "COMMITTED_CONFIG",
    "archive_settings",
    "model_snapshot",
    "render_kserve_config",
    "build_layout",
    "upload_instructions",
    "add_kserve_layout_arguments",
    "run_kserve_layout",
]

_HEADER = """\
# RobustDEQ Serve: TorchServe inside a KServe pod (config/config.properties of the model storage).
# Rendered by `robustdeq kserve-layout` from serving/config.properties and the archives'
# model-config.yaml; do not edit by hand (a test keeps serving/k8s/config.properties equal).
"""
# comments written above a key whose value differs from the local server's
_NOTES = {
    "inference_address": "Inference and metrics listen on every pod address: the KServe Service and Prometheus reach "
    "them;\n# the NetworkPolicy admits only the ingress gateway and monitoring namespaces. Management stays on "
    "loopback.",
    "grpc_inference_address": "gRPC is not exposed by the Service: loopback only.",
    "disable_token_authorization": "Token authorization is off inside the pod: TorchServe 0.12 draws new random keys "
    "at every start,\n# so no client of several replicas could hold a valid one. Authenticate at the cluster edge "
    "(serving/k8s/README.md).",
    "model_store": "The storageUri is mounted at /mnt/models; only archives from its model-store load.",
    "metrics_config": "The metric declarations travel with the layout (config/metrics.yaml).",
    "model_snapshot": "The models to load, with each archive's model-config.yaml batching and workers. TorchServe "
    "restores\n# this snapshot at start (load_models is then ignored, so it is left out).",
}


def archive_settings(mar: Path) -> Dict[str, Any]:
    """``{"name", "version", "marName", minWorkers, ...}`` of one archive, from its MANIFEST.json and
    model-config.yaml."""
    mar = Path(mar)
    if not mar.is_file():
        raise FileNotFoundError(f"archive {mar} does not exist; build it with `robustdeq archive` or `make archives`")
    with zipfile.ZipFile(mar) as zf:
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        config_name = manifest.get("configFile")
        if not config_name:
            raise ValueError(f"{mar} has no model-config.yaml (archives from `robustdeq archive` carry one)")
        config = yaml.safe_load(zf.read(config_name)) or {}
    missing = [key for key in SNAPSHOT_KEYS if key not in config]
    if missing:
        raise ValueError(f"{mar.name}: model-config.yaml lacks {', '.join(missing)}")
    settings = {"name": manifest["modelName"], "version": manifest["modelVersion"], "marName": mar.name}
    settings.update({key: int(config[key]) for key in SNAPSHOT_KEYS})
    return settings


def model_snapshot(store: Path, registrations: Sequence[str]) -> Dict[str, Any]:
    """TorchServe's ``model_snapshot`` for the given archives of ``store``: one default version each."""
    models: Dict[str, Any] = {}
    for name in registrations:
        s = archive_settings(Path(store) / f"{name}.mar")
        if s["name"] != name:
            raise ValueError(f"{name}.mar registers the model {s['name']!r}; rename the archive or rebuild it")
        entry = {"defaultVersion": True, "marName": s["marName"], **{k: s[k] for k in SNAPSHOT_KEYS}}
        models[name] = {s["version"]: entry}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def _kserve_overrides(root: str, ports: Ports, host: str, snapshot: Dict[str, Any]) -> Dict[str, Optional[str]]:
    """Property values that differ from the hardened template (None: leave the key out)."""
    store = str(PurePosixPath(root) / "model-store")
    return {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{LOOPBACK}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_address": LOOPBACK,
        "grpc_management_address": LOOPBACK,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "disable_token_authorization": "true",
        "token_expiration_min": None,
        "model_store": store,
        "allowed_urls": allowed_urls(store),
        "load_models": None,
        "metrics_config": str(PurePosixPath(root) / "config" / "metrics.yaml"),
        "disable_system_metrics": "true",
        "model_snapshot": json.dumps(snapshot, sort_keys=True, separators=(",", ":")),
    }


def render_kserve_config(
    models: Sequence[str] = DEFAULT_MODELS,
    store: Path = DEFAULT_STORE,
    root: str = KSERVE_ROOT,
    ports: Ports = KSERVE_PORTS,
    host: str = POD_BIND,
    template: Path = DEFAULT_CONFIG,
) -> str:
    """``config/config.properties`` for a KServe pod serving each model's plain and defended archive.

    ``root`` is where the layout is mounted (/mnt/models in a pod), ``ports``/``host`` the listeners;
    the defaults are what the manifests in serving/k8s/ expect."""
    registrations = registrations_for(list(models), Path(store))
    values: Dict[str, Optional[str]] = dict(parse_properties(Path(template).read_text()))
    values.update(_kserve_overrides(root, ports, host, model_snapshot(Path(store), registrations)))
    lines = [_HEADER.rstrip("\n")]
    for key, value in values.items():
        if value is None:
            continue
        if key in _NOTES:
            lines += ["", f"# {_NOTES[key]}"]
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def build_layout(
    out: Path,
    models: Sequence[str] = DEFAULT_MODELS,
    store: Path = DEFAULT_STORE,
    root: str = KSERVE_ROOT,
    ports: Ports = KSERVE_PORTS,
    host: str = POD_BIND,
    metrics: Path = DEFAULT_METRICS,
) -> List[Path]:
    """Write the KServe model storage into ``out``; returns the files written.

    Archives left in ``out/model-store`` from an earlier layout that are not part of this one are
    removed, so that an upload of ``out`` carries exactly what ``model_snapshot`` names."""
    out = Path(out)
    config = render_kserve_config(models, store, root, ports, host)
    registrations = registrations_for(list(models), Path(store))
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    written = [out / "config" / "config.properties", out / "config" / "metrics.yaml", out / "config" / "log4j2.xml"]
    written[0].write_text(config)
    shutil.copyfile(metrics, written[1])
    written[2].write_text(LOG4J2_XML)
    for name in registrations:
        target = out / "model-store" / f"{name}.mar"
        shutil.copyfile(Path(store) / f"{name}.mar", target)
        written.append(target)
    for stale in set((out / "model-store").glob("*.mar")) - set(written):
        stale.unlink()
    return written


def upload_instructions(out: Path) -> str:
    """How to put a layout where serving/k8s/inferenceservice.yaml's storageUri points."""
    return (
        f"\nUpload the contents of {out}/ to the storage the InferenceService's storageUri names:\n"
        f"  PVC (storageUri: pvc://{PVC_NAME}/{PVC_SUBPATH}, the default of serving/k8s/):\n"
        "    kubectl apply -f serving/k8s/namespace.yaml\n"
        "    kubectl -n robustdeq apply -f serving/k8s/pvc.yaml -f serving/k8s/upload/model-copy-pod.yaml\n"
        "    kubectl -n robustdeq wait --for=condition=Ready pod/robustdeq-model-copy --timeout=300s\n"
        f"    tar -C {out} -cf - . | kubectl -n robustdeq exec -i robustdeq-model-copy -- \\\n"
        f"        sh -c 'mkdir -p /data/{PVC_SUBPATH} && tar -C /data/{PVC_SUBPATH} -xf -'\n"
        "    kubectl -n robustdeq delete pod robustdeq-model-copy\n"
        f"  GCS (storageUri: gs://BUCKET/{PVC_SUBPATH}):  gsutil -m cp -r {out}/* gs://BUCKET/{PVC_SUBPATH}/\n"
        f"  S3  (storageUri: s3://BUCKET/{PVC_SUBPATH}):  aws s3 cp --recursive {out}/ s3://BUCKET/{PVC_SUBPATH}/\n"
        "Then: kubectl apply -k serving/k8s   (serving/k8s/README.md: requests, scaling, authentication)"
    )


def add_kserve_layout_arguments(p: argparse.ArgumentParser) -> None:
    """``robustdeq kserve-layout``."""
    p.description = (
        "Write the layout KServe's TorchServe runtime expects under the storageUri: "
        "config/config.properties (rendered from serving/config.properties and the archives' batching, with "
        "model_snapshot naming each model's plain and -defended archive), config/metrics.yaml, config/log4j2.xml "
        "(logs to stdout) and model-store/*.mar. Upload the folder to the storage that "
        "serving/k8s/inferenceservice.yaml names."
    )
    p.add_argument("--out", required=True, help="folder to write (created; earlier .mar files not in it are removed)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="models to serve (default: %(default)s)")
    p.add_argument("--store", default=str(DEFAULT_STORE), help="where the archives are (default: model_store/)")


def run_kserve_layout(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        written = build_layout(Path(args.out), models, Path(args.store))
    except (ServerError, FileNotFoundError, ValueError) as exc:
        print(f"robustdeq kserve-layout: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(upload_instructions(Path(args.out)))
    return 0
