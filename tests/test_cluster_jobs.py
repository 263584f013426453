"""training/k8s/: the cluster jobs (a Kubeflow PyTorchJob for DDP training, an Indexed Job of evaluation
shards and the Job that merges them) against the Kubernetes schemas and a PyTorchJob schema of our own,
their cross-references with the CLI, the recipe, the Dockerfile and each other, and their commands run
here the way the training operator and the Job controller would start them (paths and ports rewritten)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustdeq import __version__
from robustdeq.checkpoint import load_checkpoint
from robustdeq.cli import build_parser
from robustdeq.cli import main as robustdeq_main
from robustdeq.data import cache_dir, default_archive
from robustdeq.evaluation.shards import Shard
from robustdeq.evaluation.suite import SHARDABLE_FAMILIES
from robustdeq.training.config import load_config

from .k8s_schemas import build_crd_validators, builtin_errors, crd_errors, load_manifests
from .test_docker import copies, exec_form, instructions

ROOT = Path(__file__).resolve().parents[1]
JOBS_DIR = ROOT / "training" / "k8s"
SERVING_K8S = ROOT / "serving" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
KUBEFLOW = "kubeflow.org/v1"
CRD_SCHEMAS = {(KUBEFLOW, "PyTorchJob"): JOBS_DIR / "schemas" / "pytorchjob-v1.json"}
SHARD_JOB, MERGE_JOB, TRAIN_JOB = "robustdeq-evaluate-shards", "robustdeq-merge-shards", "robustdeq-train"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"  # set by the Job controller on each pod
SHIPPED_FULL_TEST = ROOT / "training" / "shipped" / "deq-small-nfgsm-rs-long" / "evaluation-full"
DOCS = [JOBS_DIR / "README.md", ROOT / "docs" / "deploying.md"]


# ---- loading ------------------------------------------------------------------------------------
def _manifests():
    return load_manifests(JOBS_DIR)


def _named(name):
    found = [doc for _, doc in _manifests() if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one resource named {name} in training/k8s/, found {len(found)}"
    return copy.deepcopy(found[0])


def _kustomization():
    return yaml.safe_load((JOBS_DIR / "kustomization.yaml").read_text())


def _pod_spec(doc):
    """The pod spec of a Job, a PyTorchJob's Master or a Pod."""
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def _pod_specs():
    """(label, pod spec) of every pod template in training/k8s/ (both PyTorchJob replica types)."""
    out = []
    for _, doc in _manifests():
        if doc["kind"] == "PyTorchJob":
            for rtype, spec in doc["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{doc['metadata']['name']}/{rtype}", spec["template"]["spec"]))
        elif doc["kind"] in ("Job", "Pod"):
            out.append((doc["metadata"]["name"], _pod_spec(doc)))
    return out


def _container(doc):
    (container,) = _pod_spec(doc)["containers"]
    return container


@pytest.fixture(scope="module")
def crd_validators():
    return build_crd_validators(CRD_SCHEMAS)


# ---- Kubernetes, modelled where the jobs depend on it ------------------------------------------
def k8s_expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion of command, args and env values (third_party/forked/golang/expansion):
    $(NAME) becomes the variable's value when the container defines NAME and stays as it is otherwise;
    $$ is a literal $; ${NAME} and $NAME are not references (only a shell would expand them)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2 : close]
                    out.append(env.get(name, f"$({name})"))
                    i = close + 1
                    continue
            out.append(text[i : i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _field_ref(path: str, pod_meta: dict) -> str:
    m = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
    if m:
        return pod_meta.get(m.group(1), {}).get(m.group(2), "")  # a missing key reads as ""
    if path in ("metadata.name", "metadata.namespace"):
        return pod_meta.get(path.split(".")[1], "")
    raise AssertionError(f"fieldRef {path} is not modelled here")


def container_env(container: dict, pod_meta: dict) -> dict:
    """The variables Kubernetes gives the container: values (expanded with the ones before them) and
    fieldRefs resolved against the pod's metadata."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = k8s_expand(var["value"], env)
        else:
            env[var["name"]] = _field_ref(var["valueFrom"]["fieldRef"]["fieldPath"], pod_meta)
    return env


def indexed_pods(job: dict):
    """What the Job controller (pkg/controller/job) starts: for an Indexed Job, pod i carries the
    annotation and label batch.kubernetes.io/job-completion-index=i, and every container gets
    JOB_COMPLETION_INDEX from it unless it declares that variable itself. Yields (index, argv, env)."""
    spec = job["spec"]
    indexed = spec.get("completionMode") == "Indexed"
    for index in range(spec.get("completions") or 1):
        meta = copy.deepcopy(spec["template"].get("metadata", {}))
        container = copy.deepcopy(spec["template"]["spec"]["containers"][0])
        if indexed:
            meta.setdefault("annotations", {})[INDEX_ANNOTATION] = str(index)
            meta.setdefault("labels", {})[INDEX_ANNOTATION] = str(index)
            if not any(v["name"] == "JOB_COMPLETION_INDEX" for v in container.get("env", [])):
                path = f"metadata.annotations['{INDEX_ANNOTATION}']"
                container.setdefault("env", []).append(
                    {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": path}}}
                )
        env = container_env(container, meta)
        argv = [k8s_expand(a, env) for a in container.get("command", []) + container["args"]]
        yield index, argv, env


def operator_env(job: dict, rtype: str, index: int) -> dict:
    """The variables Kubeflow's training operator adds to every container of a PyTorchJob pod
    (pkg/controller.v1/pytorch/envvar.go and master.go, release 1.9, no elastic policy)."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    total = sum(s.get("replicas", 1) for s in specs.values())
    nproc = job["spec"].get("nprocPerNode", "auto")  # the defaulting webhook's value when unset
    env = {"PYTHONUNBUFFERED": "1"}
    if "Master" in specs:
        (port,) = [
            p["containerPort"]
            for c in specs["Master"]["template"]["spec"]["containers"]
            if c["name"] == "pytorch"
            for p in c.get("ports", [])
            if p.get("name") == "pytorchjob-port"
        ]
        addr = f"{job['metadata']['name']}-master-0"
        rank = index + 1 if rtype == "Worker" else index
        env.update(MASTER_PORT=str(port), PET_MASTER_PORT=str(port), MASTER_ADDR=addr, PET_MASTER_ADDR=addr)
        env.update(WORLD_SIZE=str(total * (int(nproc) if nproc.isdigit() else 1)), RANK=str(rank))
        env["PET_NODE_RANK"] = str(rank)
    env["PET_NPROC_PER_NODE"] = nproc
    env["PET_NNODES"] = str(total)
    return env


# ---- the CLI and the image ----------------------------------------------------------------------
def parse_robustdeq(argv):
    """``robustdeq ...`` parsed by the real CLI parser; an argparse refusal becomes an AssertionError."""
    assert argv[0] == "robustdeq", argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"robustdeq refuses {argv[1:]}: {err.getvalue().strip()}") from None


def parse_torchrun(argv, env):
    """``torchrun ...`` parsed by torch.distributed.run's own parser with the pod's PET_* variables
    (its options read PET_<NAME> as their default); returns (torchrun options, robustdeq options)."""
    from torch.distributed.run import get_args_parser

    assert argv[0] == "torchrun", argv
    saved = {k: v for k, v in os.environ.items() if k.startswith("PET_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if k.startswith("PET_")})
        options = get_args_parser().parse_args(argv[1:])  # the env action reads os.environ when built
    finally:
        for key in [k for k in os.environ if k.startswith("PET_")]:
            del os.environ[key]
        os.environ.update(saved)
    assert options.module and options.training_script == "robustdeq", "run as torchrun -m robustdeq"
    return options, parse_robustdeq(["robustdeq", *options.training_script_args])


@pytest.fixture(scope="module")
def dockerfile():
    return instructions(DOCKERFILE.read_text())


def in_repo(image_path: str, steps) -> Path:
    """The checkout's file that the Dockerfile's COPY lines put at ``image_path`` in the image."""
    for sources, dest in copies(steps):
        if len(sources) == 1 and (image_path == dest or image_path.startswith(dest.rstrip("/") + "/")):
            return ROOT / sources[0] / os.path.relpath(image_path, dest)
    raise AssertionError(f"no COPY line of the Dockerfile puts anything at {image_path}")


def _train_args(job=None, rtype="Master"):
    job = job or _named(TRAIN_JOB)
    container = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]
    return parse_torchrun(container["args"], operator_env(job, rtype, 0))


# ---- every manifest is valid --------------------------------------------------------------------
def test_the_kustomization_and_the_namespace():
    kustomization = _kustomization()
    listed = kustomization["resources"]
    assert sorted(listed) == ["networkpolicy.yaml", "pvc.yaml", "pytorchjob.yaml"]
    serving = yaml.safe_load((SERVING_K8S / "namespace.yaml").read_text())
    assert kustomization["namespace"] == serving["metadata"]["name"], "the jobs share serving/k8s's namespace"
    for path, doc in _manifests():
        rel = path.relative_to(JOBS_DIR).as_posix()
        if rel in listed:
            assert "namespace" not in doc["metadata"], f"{rel}: kustomization.yaml sets the namespace"
        else:  # applied on their own with kubectl apply -f
            assert doc["metadata"]["namespace"] == kustomization["namespace"], rel
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "robustdeq-serve", rel
    files = {p.relative_to(JOBS_DIR).as_posix() for p, _ in _manifests()}
    assert files == {*listed, "evaluate-shards-job.yaml", "merge-shards-job.yaml", "upload/data-copy-pod.yaml"}


def test_builtin_kinds_validate_against_the_kubernetes_schemas():
    builtin = [(p, d) for p, d in _manifests() if d["apiVersion"] != KUBEFLOW]
    assert sorted(d["kind"] for _, d in builtin) == [
        "Job", "Job", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "Pod",
    ]  # fmt: skip
    for path, doc in builtin:
        assert builtin_errors(doc) == [], f"{path.name} {doc['kind']} {doc['metadata']['name']}"


def test_the_pytorchjob_validates_against_its_schema(crd_validators):
    jobs = [d for _, d in _manifests() if d["apiVersion"] == KUBEFLOW]
    assert [d["kind"] for d in jobs] == ["PyTorchJob"]
    assert crd_errors(crd_validators, jobs[0]) == []


def _replica(doc, rtype="Master"):
    return doc["spec"]["pytorchReplicaSpecs"][rtype]


def _pt_container(doc, rtype="Master"):
    return _replica(doc, rtype)["template"]["spec"]["containers"][0]


def _rename(obj, old, new):
    obj[new] = obj.pop(old)


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: _rename(d["spec"], "pytorchReplicaSpecs", "pytorchReplicaSpec"), "pytorchReplicaSpec"),
        (lambda d: _rename(d["spec"]["pytorchReplicaSpecs"], "Worker", "Chief"), "Chief"),
        (lambda d: _replica(d).update(replicas=2), "Master.replicas: 1 was expected"),
        (lambda d: _replica(d, "Worker").update(restartPolicy="Sometimes"), "restartPolicy"),
        (lambda d: _pt_container(d).update(name="trainer"), "does not contain items matching"),
        (lambda d: _pt_container(d, "Worker").pop("image"), "image"),
        (lambda d: _rename(_pt_container(d), "volumeMounts", "volumeMount"), "volumeMount"),
        (lambda d: _pt_container(d)["resources"].update(limit={}), "limit"),
        (lambda d: d["spec"].update(nprocPerNode=4), "spec.nprocPerNode: 4 is not of type"),
        (lambda d: d["spec"]["runPolicy"].update(cleanPodPolicy="Always"), "cleanPodPolicy"),
        (lambda d: d["metadata"].update(name="robustdeq_train"), "metadata.name"),
        (lambda d: d["spec"].update(elasticPolicy={"nProcPerNode": 4}), "under {'required': ['nprocPerNode']}"),
    ],
)
def test_the_pytorchjob_schema_rejects_typos_and_what_the_webhook_refuses(crd_validators, mutate, where):
    doc = _named(TRAIN_JOB)
    mutate(doc)
    errors = crd_errors(crd_validators, doc)
    assert errors and any(where in e for e in errors), errors


@pytest.mark.parametrize(
    "name, mutate, where",
    [
        (SHARD_JOB, lambda d: _rename(d["spec"], "completionMode", "completionsMode"), "completionsMode"),
        (SHARD_JOB, lambda d: d["spec"].update(parallelism="10"), "parallelism"),
        (SHARD_JOB, lambda d: _rename(_container(d)["env"][0]["valueFrom"], "fieldRef", "fieldref"), "fieldref"),
        (MERGE_JOB, lambda d: _rename(_container(d), "volumeMounts", "volumeMount"), "volumeMount"),
        ("robustdeq-data", lambda d: d["spec"].update(accessModes="ReadWriteMany"), "accessModes"),
    ],
)
def test_the_kubernetes_schemas_reject_typos(name, mutate, where):
    doc = _named(name)
    mutate(doc)
    errors = builtin_errors(doc)
    assert errors and any(where in e for e in errors), errors


# ---- the Indexed Job: one shard per completion index -------------------------------------------
def shard_problems(job: dict) -> list:
    """What would go wrong when the Job controller starts this Job: every pod must evaluate a
    different shard i/K of the same evaluation, with K = completions, into its own folder."""
    spec, problems = job["spec"], []
    if spec.get("completionMode") != "Indexed":
        problems.append("completionMode is not Indexed: the pods get no completion index")
    if spec.get("parallelism", 1) > spec.get("completions", 1):
        problems.append("parallelism exceeds completions")
    if "backoffLimitPerIndex" in spec and spec["template"]["spec"].get("restartPolicy") != "Never":
        problems.append("backoffLimitPerIndex needs restartPolicy Never (the API server refuses it otherwise)")
    shards, outs = set(), set()
    for index, argv, _ in indexed_pods(job):
        try:
            args = parse_robustdeq(argv)
            shard = Shard.parse(args.shard or "")
        except (AssertionError, ValueError) as exc:
            problems.append(f"pod {index}: {exc}")
            continue
        if (shard.index, shard.count) != (index, spec.get("completions")):
            problems.append(f"pod {index} evaluates shard {args.shard}, not {index}/completions={spec['completions']}")
        shards.add(args.shard)
        outs.add(args.out)
    if len(outs) != len(shards):
        problems.append("two shards write into the same --out folder")
    return problems


def test_the_indexed_job_hands_pod_i_shard_i_of_completions():
    job = _named(SHARD_JOB)
    assert shard_problems(job) == []
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    pods = list(indexed_pods(job))
    assert [parse_robustdeq(argv).shard for _, argv, _ in pods] == [f"{i}/{spec['completions']}" for i in range(10)]
    first = parse_robustdeq(pods[0][1])
    assert first.command == "evaluate" and first.out.endswith("/shard-0")
    # K shards of whole --block images: K must not exceed the number of blocks
    assert spec["completions"] <= math.ceil(first.n / first.block)
    assert set(first.attacks) <= set(SHARDABLE_FAMILIES), "a shard runs only per-sample families"
    assert first.device == "cpu" and first.threads == int(_container(job)["resources"]["requests"]["cpu"])
    for _, argv, env in pods:  # every $(...) resolved, so no literal "$(" reaches the process
        assert not any("$(" in a for a in argv), argv
        assert env["JOB_COMPLETION_INDEX"].isdigit()
    declared = _container(job)["env"][0]
    assert declared["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{INDEX_ANNOTATION}']"


def _set_arg(job, prefix, value):
    args = _container(job)["args"]
    (i,) = [k for k, a in enumerate(args) if a.startswith(prefix)]
    args[i] = value


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["spec"].pop("completionMode"), "completionMode"),
        (lambda d: d["spec"].update(completions=8), "not 0/completions=8"),
        (lambda d: d["spec"].update(parallelism=20), "parallelism"),
        (lambda d: d["spec"]["template"]["spec"].update(restartPolicy="OnFailure"), "restartPolicy Never"),
        # a shell's ${VAR} is not Kubernetes' $(VAR): the process would get the text unexpanded
        (lambda d: _set_arg(d, "--shard", "--shard=${JOB_COMPLETION_INDEX}/10"), "--shard takes i/k"),
        (lambda d: _set_arg(d, "--shard", "--shard=0/10"), "evaluates shard 0/10"),
        (lambda d: _set_arg(d, "--out", "--out=/data/eval/deq-small-nfgsm-rs-long/shards"), "same --out"),
        (lambda d: _set_arg(d, "--threads", "--threads=one"), "invalid int value"),
    ],
)
def test_a_broken_indexed_job_is_caught(mutate, where):
    job = _named(SHARD_JOB)
    mutate(job)
    problems = shard_problems(job)
    assert problems and any(where in p for p in problems), problems


def test_the_merge_reads_every_shard_folder_and_the_shards_read_the_trained_model():
    shard_job, merge = _named(SHARD_JOB), parse_robustdeq(_container(_named(MERGE_JOB))["args"])
    written = [parse_robustdeq(argv).out for _, argv, _ in indexed_pods(shard_job)]
    assert merge.command == "merge-shards"
    assert sorted(merge.shards) == sorted(written) and len(set(written)) == shard_job["spec"]["completions"]
    assert Path(merge.out).parent == Path(written[0]).parent and merge.out not in written
    assert merge.checkpoint is None, "the merge finds the checkpoint where the shards recorded it"
    _, train = _train_args()
    first = parse_robustdeq(next(indexed_pods(shard_job))[1])
    assert first.checkpoint == f"{train.out}/model.pt", "the shards evaluate what the PyTorchJob trains"
    assert Path(first.out).parent.name == Path(train.out).name


# ---- the PyTorchJob -----------------------------------------------------------------------------
def test_the_pytorchjob_runs_torchrun_with_the_operators_variables(dockerfile):
    job = _named(TRAIN_JOB)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    assert specs["Master"]["template"] == specs["Worker"]["template"], "Master and Worker run the same pod"
    nnodes = sum(s["replicas"] for s in specs.values())
    nproc = int(job["spec"]["nprocPerNode"])
    for rtype, ranks in (("Master", [0]), ("Worker", range(1, nnodes))):
        assert specs[rtype]["restartPolicy"] == "OnFailure"
        assert "restartPolicy" not in specs[rtype]["template"]["spec"], "the operator sets it from the replica"
        for index, rank in enumerate(ranks):
            env = operator_env(job, rtype, index)
            container = specs[rtype]["template"]["spec"]["containers"][0]
            options, train = parse_torchrun(container["args"], env)
            assert (options.nnodes, options.nproc_per_node) == (str(nnodes), str(nproc))
            assert (options.node_rank, options.master_addr) == (rank, f"{TRAIN_JOB}-master-0")
            assert options.master_port == int(env["MASTER_PORT"]) and options.rdzv_backend == "static"
            assert int(env["WORLD_SIZE"]) == nnodes * nproc
    options, train = _train_args(job)
    assert train.command == "train" and not train.restart, "--restart would discard the run on every restart"
    assert train.out.startswith("/data/") and train.max_steps is None
    recipe = in_repo(train.config, dockerfile)
    cfg = load_config(recipe, [f"run.device={train.device}"])
    world = nnodes * nproc
    assert cfg.optim.batch_size % world == 0, f"the global batch {cfg.optim.batch_size} must split over {world}"
    resources = _pt_container(job)["resources"]
    gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
    if train.device == "cpu":  # gloo: one CPU thread per process, as the recipe says
        assert gpus == 0 and int(resources["requests"]["cpu"]) == nproc * (cfg.run.threads or 1)
    else:  # NCCL: one GPU per process (cuda:LOCAL_RANK)
        assert train.device == "cuda" and gpus == nproc
    assert train.metrics_port and not any(
        p["containerPort"] == train.metrics_port for p in _pt_container(job)["ports"]
    ), "the progress metrics stay on the pod's loopback"


def test_every_pod_runs_the_project_image_as_its_user(dockerfile):
    (tag,) = re.findall(r"docker build -t (\S+) \.", DOCKERFILE.read_text())
    assert tag == f"robustdeq-serve:{__version__}"
    serving_runtime = yaml.safe_load((SERVING_K8S / "servingruntime.yaml").read_text())
    image = serving_runtime["spec"]["containers"][0]["image"]
    assert image.endswith(f"/{tag}")
    (entrypoint,) = [exec_form(a) for k, a in dockerfile if k == "ENTRYPOINT"]
    (user,) = [a for k, a in dockerfile if k == "USER"]
    uid, gid = map(int, user.split(":"))
    for label, spec in _pod_specs():
        (container,) = spec["containers"]
        assert container["image"] == image, label
        assert "command" not in container, f"{label}: keep the image's entrypoint {entrypoint} as PID 1"
        assert container["args"][0] in ("torchrun", "robustdeq", "sleep"), label
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] and (pod_security["runAsUser"], pod_security["runAsGroup"]) == (uid, gid)
        assert pod_security["fsGroup"] == gid, f"{label}: the shared volume must be writable by the image's user"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"], label
        assert security["capabilities"]["drop"] == ["ALL"], label
        assert spec["automountServiceAccountToken"] is False, f"{label}: the jobs never call the Kubernetes API"


def _under(path: str, mounts) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_every_pod_mounts_the_shared_volume_and_writes_only_to_volumes():
    pvc = _named("robustdeq-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount it at once"
    for label, spec in _pod_specs():
        (container,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) == set(volumes), f"{label}: every volume mounted, every mount declared"
        (data,) = [path for path, name in mounts.items() if "persistentVolumeClaim" in volumes[name]]
        assert volumes[mounts[data]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], label
        # the root file system is read-only: every path a process uses lies on a volume
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        paths = [env[k] for k in ("ROBUSTDEQ_DATA", "ROBUSTDEQ_CACHE", "HOME", "TMPDIR") if k in env]
        paths += [a.split("=", 1)[-1] for a in container["args"] if "/data/" in a]
        paths += [container["workingDir"]] if "workingDir" in container else []
        for path in paths:
            if not path.startswith("/opt/robustdeq/"):  # read-only inputs from the image
                assert _under(path, mounts), f"{label}: {path} is not on a mounted volume"
        if "ROBUSTDEQ_CACHE" in env:  # per pod: decoding writes temporary files named by process id
            assert "emptyDir" in volumes[mounts[env["ROBUSTDEQ_CACHE"]]], label


def test_the_network_policies_admit_only_training_peers():
    kustomized = [d for p, d in _manifests() if p.name == "networkpolicy.yaml"]
    by_name = {d["metadata"]["name"]: d["spec"] for d in kustomized}
    peers, closed = by_name["robustdeq-train-peers"], by_name["robustdeq-evaluation-no-ingress"]
    job = _named(TRAIN_JOB)
    for rtype in ("Master", "Worker"):
        labels = _replica(job, rtype)["template"]["metadata"]["labels"]
        assert peers["podSelector"]["matchLabels"].items() <= labels.items()
    assert peers["policyTypes"] == ["Ingress"]
    assert peers["ingress"] == [{"from": [{"podSelector": peers["podSelector"]}]}], "peers only, no other source"
    for name in (SHARD_JOB, MERGE_JOB):
        labels = _named(name)["spec"]["template"]["metadata"]["labels"]
        assert closed["podSelector"]["matchLabels"].items() <= labels.items(), name
    assert closed["policyTypes"] == ["Ingress"] and "ingress" not in closed, "evaluation pods accept nothing"
    declared = [p for _, spec in _pod_specs() for c in spec["containers"] for p in c.get("ports", [])]
    assert {p["name"] for p in declared} == {"pytorchjob-port"}, "no pod declares any other port"


def _shard_minutes():
    """Attack time of each committed shard log of the default's full-test run, in minutes."""
    out = {}
    for log in sorted(SHIPPED_FULL_TEST.glob("logs/shard-*.log")):
        seconds = [int(s) for s in re.findall(r"^evaluate: .*\((\d+) s\)$", log.read_text(), flags=re.M)]
        out[log.stem] = sum(seconds) / 60
    return out


def test_the_documented_shard_time_is_the_measured_one():
    minutes = _shard_minutes()
    assert len(minutes) == _named(SHARD_JOB)["spec"]["completions"] == 10
    results = json.loads((SHIPPED_FULL_TEST / "results.json").read_text())
    shard_args = parse_robustdeq(next(indexed_pods(_named(SHARD_JOB)))[1])
    assert results["config"]["n"] == shard_args.n and results["config"]["families"] == shard_args.attacks
    assert results["checkpoint"].endswith(f"/{Path(shard_args.checkpoint).parent.name}/model.pt")
    stated = f"{round(min(minutes.values()))} to {round(max(minutes.values()))} minutes"
    for doc in DOCS:
        assert stated in doc.read_text(), f"{doc.name} should say {stated!r} per shard of 1,000 images"


def _bash_lines(text: str):
    """The commands of a Markdown page's bash blocks, continuation lines joined, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def test_the_documented_commands_name_real_files_jobs_and_options(dockerfile):
    names = {d["metadata"]["name"] for _, d in _manifests()} | {f"{TRAIN_JOB}-master-0", f"{TRAIN_JOB}-worker-0"}
    torchruns = 0
    for doc in DOCS:
        text = doc.read_text()
        if doc.name == "deploying.md":  # its section on the cluster jobs
            text = text.split("## Training and evaluation on a cluster")[1].split("\n## ")[0]
        for line in _bash_lines(text):
            for path in re.findall(r"training/k8s[\w/.-]*", line):
                assert (ROOT / path).exists(), f"{doc.name}: {line}"
            if "kubectl" in line:
                found = re.findall(r"\b(?:pytorchjob|job|pod)/([\w-]+)", line)
                found += re.findall(r"\b(?:logs -f|exec -i|exec) ([\w-]+)(?=\s|$)", line)
                found += re.findall(r"\bget (?:pytorchjob|job) ([a-z][\w-]+)", line)
                assert set(found) <= names, f"{doc.name}: {line}"
            if line.startswith("torchrun "):
                argv = shlex.split(line.replace("$I", "1").replace("$HEAD", "head.example"))
                options, train = parse_torchrun(argv, {})
                assert options.rdzv_backend == "static" and options.node_rank == 1, line
                assert options.rdzv_endpoint == "head.example:29500", line
                assert (ROOT / train.config).is_file() and train.device == "cpu", line
                assert _train_args()[1].out.endswith(Path(train.out).name), "the same run as the PyTorchJob"
                torchruns += 1
    assert torchruns == len(DOCS), "each page shows the torchrun command across machines"


# ---- the commands, run here the way the cluster would start them --------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_this_machine(arg: str, data: Path, steps) -> str:
    """A container argument with the shared volume at ``data`` and the image's files from the checkout."""
    if "/opt/robustdeq/" in arg:
        head, _, path = arg.partition("/opt/robustdeq/")
        return head + str(in_repo("/opt/robustdeq/" + path, steps))
    return arg.replace("/data/", f"{data}/")


#: a few hundred images and a couple of steps (tests/test_training.py's scale)
TINY = [
    "data.val_size=200", "data.train_subset=256", "optim.batch_size=32", "optim.epochs=1", "pretrain.steps=0",
    "validation.n_clean=64", "validation.n_robust=32", "validation.selection_n=32", "validation.pgd_steps=2",
    "validation.batch_size=64", "run.log_every=2", "run.checkpoint_every=4",
]  # fmt: skip


@pytest.mark.slow
def test_the_pytorchjob_command_trains_on_two_pods_and_resumes(tmp_path, dockerfile):
    """The Master's and the Worker's container command, each with the operator's variables (the master's
    address 127.0.0.1, free ports, one process per pod to fit two cores), on a shared folder: DDP with
    gloo across the two "pods"; a first start stops after 4 steps, the restarted pods resume there."""
    if default_archive() is None:
        pytest.skip("no CIFAR-10 archive (../shared/data or $ROBUSTDEQ_DATA)")
    job = _named(TRAIN_JOB)
    data = tmp_path / "data"
    (data / "datasets").mkdir(parents=True)
    (data / "datasets" / default_archive().name).symlink_to(default_archive())
    port, metrics = str(_free_port()), _free_port()

    def start(rtype, extra):
        container = _pt_container(job, rtype)
        scratch = tmp_path / rtype / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{e["name"]: _on_this_machine(e["value"], data, dockerfile) for e in container["env"]}}
        env.update(operator_env(job, rtype, 0))
        env.update(MASTER_ADDR="127.0.0.1", PET_MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PET_MASTER_PORT=port)
        env.update(PET_NPROC_PER_NODE="1", WORLD_SIZE="2", HOME=str(scratch), TMPDIR=str(scratch))
        env.update(ROBUSTDEQ_CACHE=str(cache_dir()), PYTHONPATH=str(ROOT))  # the cache decoded once here
        args = [_on_this_machine(a, data, dockerfile) for a in container["args"]]
        args = [f"--metrics-port={metrics}" if a.startswith("--metrics-port") else a for a in args]
        argv = [sys.executable, "-m", "torch.distributed.run", *args[1:], *(a for s in TINY for a in ("--set", s))]
        log = tmp_path / rtype / f"console-{len(extra)}.log"  # files, not pipes: neither pod can block the other
        with open(log, "wb") as console:
            proc = subprocess.Popen(
                [*argv, *extra], cwd=tmp_path / rtype, env=env, stdout=console, stderr=console, start_new_session=True
            )
        return proc, log

    def run_both(extra):
        started = [start(rtype, extra) for rtype in ("Master", "Worker")]
        try:
            for proc, log in started:
                proc.wait(timeout=900)
                assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
        finally:
            for proc, _ in started:  # a pod left waiting for a failed peer
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the processes it started
                    proc.wait()
        return started[0][1].read_text(errors="replace")

    _, train = _train_args(job)
    out = Path(_on_this_machine(train.out, data, dockerfile))
    run_both(["--max-steps", "4"])  # the pods stop (here: resumably) after 4 steps
    assert (out / "last.pt").is_file() and not (out / "model.pt").exists()
    master = run_both([])  # restarted with the same command and --out
    assert f"from {out / 'last.pt'} at step 4/" in master, master[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_replicas_identical"] is True
    assert summary["steps"] == 8  # 256 images, batch 32, one epoch
    load_checkpoint(out / "model.pt").build_model()


@pytest.mark.slow
def test_the_shard_pods_and_the_merge_job_run_end_to_end(tmp_path, dockerfile, capsys):
    """Each shard pod's arguments as the Job controller and Kubernetes would expand them, then the merge
    Job's, on a shared folder holding the shipped default checkpoint where the PyTorchJob writes its
    model: 10 shards of one image each (--n 10 --block 1) with cheap attack settings appended."""
    if default_archive() is None:
        pytest.skip("no CIFAR-10 archive (../shared/data or $ROBUSTDEQ_DATA)")
    data = tmp_path / "data"
    shard_job, merge_job = _named(SHARD_JOB), _named(MERGE_JOB)
    first = parse_robustdeq(next(indexed_pods(shard_job))[1])
    checkpoint = Path(_on_this_machine(first.checkpoint, data, dockerfile))
    checkpoint.parent.mkdir(parents=True)
    shutil.copyfile(ROOT / "training" / "shipped" / "deq-small-nfgsm-rs-long" / "model.pt", checkpoint)
    cheap = ["--n=10", "--block=1", "--steps=1", "--apgd-iters=2", "--apgd-targets=1", "--select-n=8"]
    threads = torch.get_num_threads()
    try:
        for _, argv, _ in indexed_pods(shard_job):
            args = [_on_this_machine(a, data, dockerfile) for a in argv]
            assert robustdeq_main([*args[1:], *cheap]) == 0
        merge_args = [_on_this_machine(a, data, dockerfile) for a in _container(merge_job)["args"]]
        assert robustdeq_main(merge_args[1:]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    merged = Path(parse_robustdeq(merge_args).out)
    results = json.loads((merged / "results.json").read_text())
    assert results["subset"]["n"] == 10 and results["config"]["families"] == first.attacks
    assert all(len(v) == 10 for v in results["per_sample"].values()), "one record per image of the 10 shards"
    state = json.loads((merged / "state.json").read_text())
    assert sorted(state["merged_from"]) == sorted(parse_robustdeq(merge_args).shards)
    assert (merged / "report.md").is_file() and (merged / "robustness_card.json").is_file()


def test_parse_helpers_refuse_what_the_cli_refuses():
    with pytest.raises(AssertionError, match="invalid choice"):
        parse_robustdeq(["robustdeq", "evaluat", "--checkpoint", "x"])
    assert isinstance(parse_robustdeq(["robustdeq", "merge-shards", "--out", "m", "a"]), argparse.Namespace)
    assert k8s_expand("$(A)/$(B)/$$(A)/${A}/$A/$(", {"A": "1"}) == "1/$(B)/$(A)/${A}/$A/$("
