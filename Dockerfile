# syntax=docker/dockerfile:1
# RobustDEQ Serve: TorchServe with the shipped robust DEQ archives, on a GPU or on the CPU.
#
#   docker build -t robustdeq-serve:0.1.0 .
#   docker run -d --name robustdeq --gpus all -p 127.0.0.1:8080:8080 -p 127.0.0.1:8082:8082 robustdeq-serve:0.1.0
#   docker exec robustdeq robustdeq predict /opt/robustdeq/serving/examples/ship.png --defense on
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/var/lib/robustdeq/runs" robustdeq-serve:0.1.0 \
#       torchrun --standalone --nproc_per_node 8 -m robustdeq train \
#       --config /opt/robustdeq/training/configs/mdeq-large-trades-rs.yaml --data torchvision --out runs/mdeq-large
#
# Leave out --gpus on a host without an NVIDIA GPU: the same image then serves on the CPU.
# The KServe runtime instead of TorchServe (OIP v2 and KServe v1 on 8080, OIP v2 gRPC on 7070, metrics
# on 8080 /metrics, token in /var/lib/robustdeq/kserve/key_file.json; the same HEALTHCHECK finds it):
#   docker build --build-arg KSERVE=1 -t robustdeq-serve-kserve:0.1.0 .
#   docker run -d -p 127.0.0.1:8080:8080 -p 127.0.0.1:7070:7070 robustdeq-serve-kserve:0.1.0 \
#       robustdeq serve --runtime kserve --bind 0.0.0.0 --inference-port 8080
# Ports: 8080 inference API (token authorization on; the key file is /var/lib/robustdeq/key_file.json),
# 8082 Prometheus metrics, 7070 gRPC inference. The management API (8081) and gRPC management
# (7071) stay on the container's loopback: use them with `docker exec`.
# Publish ports on 127.0.0.1 as above and put a TLS reverse proxy in front to expose the server.

# CUDA 13.0 runtime, matching the pinned torch 2.14.1+cu130 wheels (they carry their own CUDA
# libraries; the host needs an NVIDIA driver for CUDA 13 and the NVIDIA Container Toolkit).
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ROBUSTDEQ_HOME=/opt/robustdeq \
    ROBUSTDEQ_RUN_DIR=/var/lib/robustdeq \
    ROBUSTDEQ_CACHE=/var/lib/robustdeq/cache

# Python 3.11 (the version CI tests), Java 17 for TorchServe's frontend, and tini as PID 1 so
# that `docker stop` (SIGTERM) reaches `robustdeq serve`, which stops TorchServe's process group.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        openjdk-17-jre-headless \
        python3.11 \
        python3.11-venv \
        tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# The large pinned packages first, so that a code change does not download them again. These pins
# are pyproject.toml's (tests/test_docker.py checks that they agree).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir torchserve==0.12.0 torch-model-archiver==0.12.0

# The library with the rest of its pinned dependencies (a regular install, not editable).
COPY pyproject.toml README.md /tmp/src/
COPY robustdeq /tmp/src/robustdeq
RUN pip install --no-cache-dir /tmp/src && rm -rf /tmp/src

# The KServe runtime (`robustdeq serve --runtime kserve`), only in an image built with
# --build-arg KSERVE=1: kserve pins protobuf < 7, so it gets its own venv layered over /opt/venv
# (docs/serving.md, "The KServe runtime"), with the pins of pyproject.toml's 'kserve' extra.
ARG KSERVE=0
COPY pyproject.toml /tmp/kserve/
RUN if [ "${KSERVE}" = "1" ]; then \
        python3.11 -m venv /opt/kserve-venv \
        && python -c "import tomllib; f = open('/tmp/kserve/pyproject.toml', 'rb'); \
print('\n'.join(tomllib.load(f)['project']['optional-dependencies']['kserve']))" > /tmp/kserve/requirements.txt \
        && /opt/kserve-venv/bin/pip install --no-cache-dir -r /tmp/kserve/requirements.txt \
        && python -c "import site; print(site.getsitepackages()[0])" \
            > /opt/kserve-venv/lib/python3.11/site-packages/robustdeq-main-venv.pth; \
    fi \
    && rm -rf /tmp/kserve
ENV ROBUSTDEQ_KSERVE_PYTHON=/opt/kserve-venv/bin/python

# What `robustdeq serve` reads from $ROBUSTDEQ_HOME: the hardened config, the metric declarations,
# the handler (to build new archives with `robustdeq archive`), the shipped archives, example images;
# and the training recipes, so that the image also trains on GPUs (`torchrun ... -m robustdeq train`).
COPY serving/config.properties serving/metrics.yaml /opt/robustdeq/serving/
COPY serving/examples /opt/robustdeq/serving/examples
COPY handlers /opt/robustdeq/handlers
COPY model_store /opt/robustdeq/model_store
COPY training/configs /opt/robustdeq/training/configs

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin robustdeq \
    && mkdir -p /var/lib/robustdeq \
    && chown robustdeq:robustdeq /var/lib/robustdeq
USER 10001:10001
WORKDIR /var/lib/robustdeq

EXPOSE 8080 8082 7070

# /ping with the inference token, read from the key file at every check (keys change at each start);
# for the KServe runtime (its runtime.json in the run folder), /v2/health/ready and each model's ready.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "robustdeq.serving.health", "--quiet"]

ENTRYPOINT ["tini", "--"]
CMD ["robustdeq", "serve", "--foreground", "--bind", "0.0.0.0"]
