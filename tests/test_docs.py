"""The README is executable documentation.

- Blocks marked ``<!-- docs-test: run -->`` run as written, in order, in a scratch folder that
  looks like a checkout (the repository's .venv, model store and serving files linked in):
  ``make serve``, the curl and Python client calls, ``robustdeq card``, ``make stop``. A block
  marked ``<!-- docs-test: output -->`` must equal the output of the block before it.
- Every other command in the README and the reference pages under docs/ (in ``bash`` blocks or
  inline code) must be matched by
  ``COVERED`` to the test that exercises the same command here, or to ``.ci/run``. Commands
  that need Docker, a cluster or GPUs map to the tests that check what can be checked without
  them (tests/test_docker.py, tests/test_k8s.py, the 2-process torchrun test).
- Links to files and anchors in the README, in docs/ and in every folder's README resolve
  (anchors in other Markdown files too).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from robustdeq.data import PROJECT_ROOT
from robustdeq.serving.runfolder import ServerError
from robustdeq.serving.server import Ports, _ports_free

README = PROJECT_ROOT / "README.md"
#: the pages whose commands must be exercised: the README and the reference under docs/
COMMAND_PAGES = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
#: the pages whose links must resolve: those and every folder's README
PAGES = [*COMMAND_PAGES, *sorted(p for p in PROJECT_ROOT.glob("*/**/README.md") if ".venv" not in p.parts)]
MARKER = re.compile(r"<!-- docs-test: (\w+) -->\n```(\w*)\n(.*?)```", re.S)
COMMAND_PREFIXES = (
    "make ",
    "robustdeq ",
    ".venv/bin/",
    "docker ",
    "torchrun ",
    "curl ",
    "bash ",
    "kubectl ",
    "pytest ",
)

SHELL_SYNTAX = {"for", "do", "done", "while", "if", "then", "else", "fi", "wait"}
DOCS = "tests/test_docs.py::test_quick_readme_blocks_run"
CI = ".ci/run"
RD = r"(\.venv/bin/)?robustdeq "
DOCKER_TEST = "tests/test_docker.py::test_the_images_cmd_and_healthcheck_serve_from_the_copied_folders"
# (pattern matched at the start of a command, where it is exercised); the first match wins
COVERED = [
    (r"make (serve|stop)\b", DOCS),
    (r"make test\b", CI),
    (r"make help\b", "tests/test_docs.py::test_make_help_lists_the_readme_targets"),
    (RD + "demo --checkpoint", "tests/test_docs.py::test_the_readme_picture_is_reproducible"),
    (r"make demo\b|" + RD + "demo\\b", "tests/test_cli.py::test_demo_runs_on_real_images"),
    (r"make archives\b|" + RD + "archive\\b", "tests/test_serving.py::test_shipped_archives_rebuild_byte_for_byte"),
    (r"make bench\b|" + RD + "bench\\b", "tests/test_cli.py::test_bench_writes_json_and_markdown"),
    (
        r"make gpu-check\b|" + RD + "gpu-check\\b",
        "tests/test_gpu_check.py::test_gpu_check_in_cpu_mode_passes_and_says_what_it_skipped",
    ),
    (
        r"make loadtest\b|\.venv/bin/locust\b|" + RD + "loadtest\\b",
        "tests/test_loadtest.py::test_smoke_run_end_to_end_has_no_failures_and_exact_counts",
    ),
    (r"make (train|evaluate)-shipped\b|bash training/", "tests/test_docs.py::test_shipped_scripts_call_real_recipes"),
    (
        RD + "training-speed\\b",
        "tests/test_training_speed.py::test_the_lever_benchmark_times_each_lever_against_the_recipe",
    ),
    (RD + "cifar-folder\\b", "tests/test_image_folder.py::test_cifar_folder_writes_a_folder_the_index_reads"),
    (RD + "train\\b", "tests/test_training.py::test_tiny_run_learns_and_writes_a_safe_checkpoint"),
    (
        r"torchrun .*--node-rank",
        "tests/test_cluster_jobs.py::test_the_pytorchjob_command_trains_on_two_pods_and_resumes",
    ),
    (r"torchrun\b", "tests/test_training.py::test_torchrun_two_process_gloo"),
    (RD + "accuracy\\b", "tests/test_cli.py::test_accuracy_command_reads_a_checkpoint"),
    (RD + "evaluate\\b", "tests/test_evaluation.py::test_evaluation_end_to_end"),
    (RD + "merge-shards\\b", "tests/test_shards.py::test_sharded_run_equals_one_process"),
    (RD + "combine-cards\\b", "tests/test_combine_cards.py::test_the_card_keeps_each_row_at_its_own_n"),
    (RD + "attack-coverage\\b", "tests/test_coverage.py::test_the_shipped_evaluation_and_its_report"),
    (RD + "models\\b", "tests/test_cli.py::test_models_lists_every_preset"),
    (RD + "compare\\b", "tests/test_evaluation.py::test_cli_compare_prints_mcnemar_table"),
    (RD + "card\\b", "tests/test_cli.py::test_card_prints_the_trade_off_from_any_of_its_homes"),
    (RD + "export\\b", "tests/test_serving.py::test_onnx_export_matches_pytorch_on_real_images"),
    (RD + "serve --runtime kserve", "tests/test_kserve_runtime.py::test_serve_runtime_kserve_is_the_runtime_process"),
    (
        r"make kserve-env\b|python3 -m venv \.cache/kserve-venv|\.venv/bin/python -c \"import site",
        "tests/test_kserve_runtime.py::test_the_kserve_environment_layers_over_the_project",
    ),
    (r"TOKEN=.*kserve/key_file|curl -s localhost:8085/", "tests/test_kserve_runtime.py::test_the_documented_curls"),
    (RD + "serve --bind", DOCKER_TEST),
    (RD + "(serve|stop|predict)\\b", "tests/test_serving_server.py::test_python_client_cli"),
    (RD + "kserve-layout\\b", "tests/test_k8s.py::test_the_layout_builder_writes_config_metrics_and_archives"),
    (RD + "--help", "tests/test_cli.py::test_help_explains_the_subcommands"),
    (r"docker\b", DOCKER_TEST),
    (
        r"kubectl\b.*(training/k8s|robustdeq-(train|evaluate-shards|merge-shards|data))",
        "tests/test_cluster_jobs.py::test_the_indexed_job_hands_pod_i_shard_i_of_completions",
    ),
    (r"kubectl\b", "tests/test_k8s.py::test_kserve_resources_validate_against_their_schemas"),
    (r"curl -X POST \S+/token", "tests/test_serving_server.py::test_a_key_rotates_as_the_readme_says"),
    (r"pytest -s (tests/\S+)", "the named test"),
    (r"\.venv/bin/python$", DOCS),
]


def readme() -> str:
    return README.read_text()


def commands(text: str) -> list[str]:
    """Commands of the ``bash`` blocks that are not run here, and inline code that starts like one."""
    run_blocks = {m.start(3) for m in MARKER.finditer(text) if m[1] == "run"}
    found = []
    for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
        if m[1] != "bash" or m.start(2) in run_blocks:
            continue
        for line in m[2].replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#") and line.split()[0].rstrip(";") not in SHELL_SYNTAX:
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [m[1] for m in re.finditer(r"`([^`\n]+)`", prose) if m[1].startswith(COMMAND_PREFIXES)]
    return found


def test_every_documented_command_is_exercised_somewhere():
    missing, targets = [], set()
    for page in COMMAND_PAGES:
        for command in commands(page.read_text()):
            match = next(((p, t) for p, t in COVERED if re.match(p, command)), None)
            if match is None:
                missing.append(f"{page.relative_to(PROJECT_ROOT)}: {command}")
                continue
            targets.add(match[1] if match[1] != "the named test" else re.match(match[0], command)[1])
    assert not missing, "documented commands no test exercises (add one, or map it in COVERED):\n" + "\n".join(missing)
    for target in targets:
        if target == CI:
            assert "make test" in (PROJECT_ROOT / ".ci" / "run").read_text()
            continue
        path, _, name = target.partition("::")
        source = (PROJECT_ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{target} does not exist"
    assert len([m for m in MARKER.finditer(readme()) if m[1] == "run"]) >= 3


def anchors_of(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text (repeated headings get -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(
            next(f"{slug}-{i}" if i else slug for i in range(9) if (f"{slug}-{i}" if i else slug) not in anchors)
        )
    return anchors


def test_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(PROJECT_ROOT)}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors_of(file.read_text()):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_make_help_lists_the_readme_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for target in set(re.findall(r"`make ([a-z-]+)`", readme())) - {"help"}:
        assert f"make {target}" in out.stdout, f"make help does not list {target}"


def _default_ports_free() -> bool:
    try:
        _ports_free(Ports())
    except ServerError:
        return False
    return True


@pytest.fixture
def checkout(tmp_path):
    """A scratch folder that looks like a checkout: the installed .venv and the data folders are
    linked, Makefile and pyproject.toml copied with their times (so make does not reinstall)."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    if not (PROJECT_ROOT / ".venv" / "bin" / "robustdeq").exists():
        pytest.skip("the README's commands use .venv (make setup)")
    for name in (".venv", "model_store", "serving", "handlers", "training", "robustdeq", "loadtest"):
        os.symlink(PROJECT_ROOT / name, tmp_path / name)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(PROJECT_ROOT / name, tmp_path / name)
    return tmp_path


def test_quick_readme_blocks_run(checkout):
    if not _default_ports_free():
        pytest.skip("the README's commands use ports 8080-8082 and 7070-7071, which are taken (a `make serve`?)")
    blocks = list(MARKER.finditer(readme()))
    outputs = []
    try:
        for marker, lang, body in (m.groups() for m in blocks):
            if marker == "output":
                assert outputs and outputs[-1].strip() == body.strip(), "README output block differs from the command's"
                continue
            assert marker == "run" and lang in ("bash", "python"), (marker, lang)
            cmd = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [str(checkout / ".venv/bin/python")]
            proc = subprocess.run(cmd, input=body if lang == "python" else None, cwd=checkout, capture_output=True,
                                  text=True, timeout=400)  # fmt: skip
            assert proc.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{proc.stdout}\n--- {proc.stderr}"
            outputs.append(proc.stdout)
    finally:
        subprocess.run([sys.executable, "-m", "robustdeq", "stop", "--run-dir", str(checkout / ".serve")],
                       capture_output=True, timeout=120)  # fmt: skip
    first, python, protocols = outputs[0], outputs[1], outputs[2]
    assert '"model": "deq-small"' in first and '"model": "deq-small-defended"' in first and '"error"' not in first
    assert first.count("defense on (T_f=2, R=10)") == 10, first
    assert python.startswith("200 ship") and "'acc': 0.305" in python, python
    v1, end = json.JSONDecoder().raw_decode(protocols)  # the two curl answers, back to back
    oip = json.loads(protocols[end:])
    assert v1["predictions"][0]["label"] == "ship" and oip["model_name"] == "deq-small-defended", protocols
    assert [o["name"] for o in oip["outputs"]] == ["label", "entropy"] and oip["outputs"][0]["data"] == ["ship"]
    assert (oip["parameters"]["T_f"], oip["parameters"]["R"]) == (2, 10)


def test_the_readme_picture_is_reproducible(checkout):
    command = re.search(r"`(robustdeq demo --checkpoint [^`]+)`", readme())[1]
    args = command.split()[1:]
    proc = subprocess.run([str(checkout / ".venv/bin/robustdeq"), *args], cwd=checkout, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (checkout / "docs" / "img" / "dynamics.png").stat().st_size > 10_000
    caption = " ".join(readme().split())
    figures = re.search(r"to ([\d.]+)% at the readout state z\[(\d+)\]\. The attack takes z\[\2\] to ([\d.]+)%, and "
                        r"Algorithm 1 \(T_f = 2, R = 10\) leaves it at ([\d.]+)%", caption)  # fmt: skip
    assert figures, "the caption's figures"
    clean, _, pgd, defended = figures.groups()
    assert f"clean {clean}%, PGD {pgd}%, PGD + Algorithm 1 {defended}%" in proc.stdout, proc.stdout


def test_shipped_scripts_call_real_recipes(tmp_path):
    """train_shipped.sh, evaluate_shipped.sh and evaluate_full_test.sh (hours) with a stub in place
    of robustdeq: every command they would run names a recipe and a checkpoint that exist, models
    not trained yet are skipped, and their outputs land."""
    root = tmp_path / "repo"
    shutil.copytree(PROJECT_ROOT / "training", root / "training", ignore=shutil.ignore_patterns("*.pt"))
    trained = sorted(p.parent.name for p in (PROJECT_ROOT / "training" / "shipped").glob("*/model.pt"))
    for recipe in trained:  # the scripts look for the checkpoints; the stub never reads them
        (root / "training" / "shipped" / recipe / "model.pt").write_bytes(b"")
    stub = tmp_path / "robustdeq"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" >> "$STUB_LOG"\n'
        '[ -n "${STUB_FAIL:-}" ] && [[ " $* " == *" --shard $STUB_FAIL "* ]] && exit 1\n'
        'out=""; prev=""; for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done\n'
        'case "$1" in evaluate|merge-shards) mkdir -p "$out"; for f in results.json report.md plot.png '
        'robustness_card.json state.json; do echo "{}" > "$out/$f"; done;; combine-cards) echo "{}" > "$out";; esac\n'
    )
    stub.chmod(0o755)
    env = {**os.environ, "ROBUSTDEQ": str(stub), "RD": str(stub), "PY": str(stub), "STUB_LOG": str(tmp_path / "log")}
    for script in ("train_shipped.sh", "evaluate_shipped.sh"):
        proc = subprocess.run(["bash", str(root / "training" / script)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    trains = [c for c in calls if c.startswith("train ")]
    evaluations = [c for c in calls if c.startswith("evaluate ")]
    assert len(trains) == 13 and any(c.startswith("compare ") for c in calls)
    assert {re.search(r"shipped/([^/]+)/model.pt", c)[1] for c in evaluations} == set(trained) - {"lyadeq-tiny-clean"}
    assert "-m robustdeq.evaluation.results_page" in calls
    for call in trains:
        assert (PROJECT_ROOT / re.search(r"--config (\S+)", call)[1]).is_file(), call
    assert (root / "training" / "shipped" / "comparisons.md").is_file()
    if "deq-small-nfgsm-rs" in trained:  # the default's defense on the first 200 images, with a combined card
        assert any(c.startswith("evaluate ") and "--n 200" in c for c in calls)
        # the newest long run that has finished is the one whose defense is evaluated
        default = next(r for r in ("deq-small-nfgsm-rs-100", "deq-small-nfgsm-rs-long", "deq-small-nfgsm-rs")
                       if r in trained)  # fmt: skip
        assert any(c.startswith(f"combine-cards runs/eval/{default} ") for c in calls)
    for recipe in {"lyadeq-small-clean", "deq-small-clean"} & set(trained):  # paper 2's count: the final iterate
        final = root / "training" / "shipped" / recipe / "evaluation" / "final-iterate-pgd.json"
        assert (
            final.is_file()
            or f"accuracy --checkpoint training/shipped/{recipe}/model.pt --n 1000 --step-size "
            f"1/255 --no-progress --out {final.relative_to(root)}"
            in calls
        )
    for recipe in {"deq-small-nfgsm-rs-100", "resnet-peer-nfgsm-long"} & set(trained):  # AutoAttack standard
        assert any(f"shipped/{recipe}/model.pt" in c and "--attacks autoattack " in c
                   and c.endswith(f"--out runs/eval/{recipe}") for c in evaluations), recipe  # fmt: skip
    # the full test set: two shards at once, then the merge, copied next to the checkpoint
    env["RECIPE"] = trained[0]
    proc = subprocess.run(["bash", str(root / "training" / "evaluate_full_test.sh")], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    shard_calls = [c for c in calls if "--n 10000" in c and "--shard" in c]
    assert len(shard_calls) == 2 and calls[-1].startswith(f"merge-shards --out runs/eval-full/{trained[0]}/merged")
    full = root / "training" / "shipped" / trained[0] / "evaluation-full"
    assert (full / "robustness_card.json").is_file() and (full / "plot.png").is_file()
    assert sorted(p.name for p in (full / "logs").iterdir()) == ["shard-0.log", "shard-1.log"]
    # a failed shard stops the script before the merge and names its log
    (tmp_path / "log").write_text("")
    proc = subprocess.run(["bash", str(root / "training" / "evaluate_full_test.sh")], env={**env, "STUB_FAIL": "1/2"},
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and f"runs/eval-full/{trained[0]}/shard-*.log" in proc.stderr
    assert not any(c.startswith("merge-shards") for c in (tmp_path / "log").read_text().splitlines())
    # SHARDS=2: a new evaluation runs as two one-thread shards without the whole-subset families
    # (the checks), is merged, and then finishes in one process with every family
    recipe = "deq-small-clean"
    (root / "training" / "shipped" / recipe / "model.pt").write_bytes(b"")
    shutil.rmtree(root / "runs", ignore_errors=True)  # not started yet, on a fresh checkout (no runs/ at all)
    (tmp_path / "log").write_text("")
    env.update(SHARDS="2", DEFENDED_N="0", AUTOATTACK="0")
    proc = subprocess.run(["bash", str(root / "training" / "evaluate_shipped.sh"), recipe], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    shards = [c for c in calls if "--shard" in c]  # only the new evaluation: the transfer passes resume it
    assert sorted(re.search(r"--shard (\S+) .*--out (\S+)", c).groups() for c in shards) == [
        ("0/2", f"runs/eval/{recipe}-shard-0"), ("1/2", f"runs/eval/{recipe}-shard-1")]  # fmt: skip
    assert all("checks" not in c and "radii" in c and "--threads 1" in c for c in shards)
    assert calls[2].startswith(f"merge-shards --out runs/eval/{recipe} runs/eval/{recipe}-shard-0")
    assert calls[3].startswith("evaluate ") and "checks" in calls[3] and calls[3].endswith(f"--out runs/eval/{recipe}")
    # with only this recipe in runs/eval (a fresh checkout), its pairs compare with the committed evaluations
    partner = root / "training" / "shipped" / "lyadeq-small-clean" / "evaluation"
    if (partner / "results.json").is_file():
        assert f"compare runs/eval/{recipe} {partner.relative_to(root)} --metric clean" in "\n".join(calls)
    # AUTOATTACK=0: the long-budget pair's evaluation without the reference AutoAttack pass (hours)
    recipe = "deq-small-nfgsm-rs-100"
    if recipe in trained:
        (tmp_path / "log").write_text("")
        proc = subprocess.run(["bash", str(root / "training" / "evaluate_shipped.sh"), recipe], env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        calls = (tmp_path / "log").read_text().splitlines()
        assert any(c.startswith("evaluate ") and f"shipped/{recipe}/model.pt" in c for c in calls)
        assert not any("--attacks autoattack" in c for c in calls)
        del env["AUTOATTACK"]
        proc = subprocess.run(["bash", str(root / "training" / "evaluate_shipped.sh"), recipe], env=env,
                              capture_output=True, text=True)  # fmt: skip
        calls = (tmp_path / "log").read_text().splitlines()
        assert proc.returncode == 0 and any("--attacks autoattack" in c for c in calls), proc.stderr
