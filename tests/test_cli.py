import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "robustdeq", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_help_explains_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("models", "demo", "bench"):
        assert word in out.stdout
    demo = run_cli("demo", "--help")
    assert "--train-steps" in demo.stdout and "T_f" in demo.stdout


#: the subcommands of the first release: each must stay (a renamed one keeps its old spelling for a release)
FIRST_RELEASE = (
    "models demo bench gpu-check accuracy export train evaluate merge-shards compare card combine-cards "
    "attack-coverage archive serve health kserve-layout stop predict loadtest"
).split()


def test_every_subcommand_is_listed_and_answers_help(capsys):
    from robustdeq.cli import COMMANDS, main

    assert set(FIRST_RELEASE) <= set(COMMANDS)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    listed = capsys.readouterr().out
    assert done.value.code == 0
    for name in COMMANDS:
        assert re.search(rf"^    {re.escape(name)}(  |\n)", listed, re.M), f"{name} is not listed"
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: robustdeq {name} "), name


def test_every_python_m_tool_is_a_subcommand():
    """A module that runs under ``python -m`` is a tool; each is reachable as ``robustdeq NAME`` too."""
    from robustdeq.cli import COMMANDS

    tools = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "robustdeq").rglob("*.py")
        if 'if __name__ == "__main__"' in path.read_text() and path.name not in ("cli.py", "__main__.py")
    }
    # entry points that a subcommand starts as its own process, in another environment
    started_by = {"robustdeq.serving.kserve_runtime": "serve --runtime kserve"}
    reachable = {c.module for c in COMMANDS.values()} | set(started_by)
    assert len(tools) >= 9 and tools <= reachable, tools - reachable


@pytest.mark.parametrize(
    "module",
    ["robustdeq.training.profile", "robustdeq.training.speed", "robustdeq.training.budget",
     "robustdeq.training.long_runs", "robustdeq.evaluation.results_page", "robustdeq.serving.fuzz",
     "robustdeq.serving.health"],
)  # fmt: skip
def test_python_m_entry_points_keep_working_for_scripts(module, capsys):
    from importlib import import_module

    with pytest.raises(SystemExit) as done:
        import_module(module).main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_the_generators_of_committed_files_print_them():
    assert run_cli("metrics-yaml").stdout == (ROOT / "serving" / "metrics.yaml").read_text()
    dashboard = ROOT / "serving" / "grafana" / "robustdeq-dashboard.json"
    assert run_cli("grafana-dashboard").stdout == dashboard.read_text()


def test_help_imports_no_tool_and_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "from robustdeq.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('robustdeq')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['robustdeq', 'robustdeq.cli']"


def test_console_script_is_installed():
    exe = shutil.which("robustdeq", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("package not installed into this interpreter's environment")
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.startswith("robustdeq ")


def test_models_lists_every_preset():
    out = run_cli("models")
    assert out.returncode == 0
    assert "mdeq-large" in out.stdout and "11,101,430" in out.stdout and "lyadeq-resnet20" in out.stdout


def test_no_command_prints_help_and_fails():
    out = run_cli()
    assert out.returncode == 2 and "usage" in out.stdout


def test_demo_runs_on_real_images(cifar_test):
    out = run_cli("demo", "--n", "3", "--train-steps", "3")
    assert out.returncode == 0, out.stderr
    assert "entropy H(z[t])" in out.stdout and "defended ->" in out.stdout
    assert out.stdout.count("true ") == 3


def test_bench_writes_json_and_markdown(tmp_path):
    target = tmp_path / "bench.json"
    out = run_cli("bench", "--batch-size", "4", "--T_f", "4", "8", "--R", "1", "--repeats", "1", "--out", str(target))
    assert out.returncode == 0, out.stderr
    data = json.loads(target.read_text())
    assert [(d["T_f"], d["R"]) for d in data["defense"]] == [(4, 1), (8, 1)]
    assert all(d["samples_per_s"] > 0 and d["floor_s"] > 0 for d in data["defense"])
    assert "| T_f | R |" in target.with_suffix(".md").read_text()


def test_bad_data_source_is_a_clear_error():
    out = run_cli("demo", "--data", "/nonexistent/cifar.tar.gz", "--train-steps", "1")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_train_help_print_config_and_clear_errors():
    out = run_cli("train", "--help")
    assert out.returncode == 0 and "--metrics-port" in out.stdout and "resumes" in out.stdout
    out = run_cli(
        "train", "--config", "training/configs/deq-tiny-trades-rs.yaml", "--set", "attack.eps=4/255", "--print-config"
    )
    assert out.returncode == 0
    import yaml

    cfg = yaml.safe_load(out.stdout)
    assert cfg["objective"]["kind"] == "trades" and cfg["objective"]["random_depth"] is True
    assert abs(cfg["attack"]["eps"] - 4 / 255) < 1e-12
    bad = run_cli("train", "--config", "training/configs/deq-tiny-pgd.yaml", "--set", "optim.lrr=1", "--print-config")
    assert bad.returncode == 2 and "unknown config key(s) optim.lrr" in bad.stderr
    missing = run_cli("train", "--config", "training/configs/nope.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_accuracy_command_reads_a_checkpoint(tmp_path, cifar_test):
    import torch

    from robustdeq import create_model
    from robustdeq.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("deq-tiny", readout_state=6)
    save_checkpoint(Checkpoint("deq-tiny", model.config(), model.state_dict()), tmp_path / "m.pt")
    out = run_cli(
        "accuracy", "--checkpoint", str(tmp_path / "m.pt"), "--n", "16", "--pgd-steps", "1", "--no-progress",
        "--step-size", "1/255", "--out", str(tmp_path / "acc.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "acc.json").read_text())
    assert result["n"] == 16 and result["state"] == 6 and len(result["robust_acc_per_state"]) == 8
    assert result["n_states"] == 8 and "step 0.00392" in result["attack"]  # paper 2's step, as asked
    assert 0 <= result["pgd_acc"] <= result["clean_acc"] + 0.5
    assert "deq-tiny at z[6] on 16 test images" in out.stdout
    final = f"(z[8]: clean {100 * result['clean_acc_final']:.2f}%, PGD-1 {100 * result['pgd_acc_final']:.2f}%)"
    assert final in out.stdout  # the final state as well, where it is not the readout
    bad = run_cli("accuracy", "--checkpoint", str(tmp_path / "missing.pt"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_card_prints_the_trade_off_from_any_of_its_homes(tmp_path):
    import re

    shipped = ROOT / "training" / "shipped" / "deq-tiny-trades-rs"
    homes = (ROOT / "model_store" / "deq-tiny.mar", shipped / "model.pt", shipped, shipped / "robustness_card.json")
    outputs = [run_cli("card", str(p)).stdout for p in homes]
    assert outputs[0] and all(out == outputs[0] for out in outputs)
    rows = outputs[0].splitlines()[2:]
    costs = [float(re.search(r" ([\d.]+)x ", row)[1]) for row in rows]
    assert costs == sorted(costs) and rows[0].startswith("none") and len(rows) == 12
    adaptive = next(row for row in rows if row.startswith("defense-T2-R10") and "adaptive" in row)
    assert "40.8 [37.8, 43.9]" in adaptive and "20.3 [17.9, 22.9]" in adaptive and "27.4x" in adaptive
    card = json.loads((shipped / "robustness_card.json").read_text())
    del card["settings"][0]["robust"]
    (tmp_path / "robustness_card.json").write_text(json.dumps(card))
    proc = run_cli("card", str(tmp_path))
    assert proc.returncode != 0 and "robustness card invalid" in proc.stderr
