"""Hyperparameter search: spaces, trials as runs, failures recorded, pruning, crash resume, and two
workers on one PostgreSQL study."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml

from dstune.config import ConfigError, RunConfig, load_config
from dstune.tune.space import PRESETS, parse_space, to_overrides
from dstune.tune.study import run_tune

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:24]
    path = tmp_path_factory.mktemp("tune") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def base_yaml(tmp_path: Path, data: Path, tune: dict, **train) -> Path:
    cfg = {"model": {"name": "tiny:deepseek-llm"}, "data": {"train": str(data), "max_length": 48},
           "method": "lora", "train": {"micro_batch_size": 4, "max_steps": 4, "eval_every": 2, "progress": False,
                                       **train},
           "tune": {"output": str(tmp_path / "study"), **tune}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_presets_name_only_real_config_keys():
    for name in PRESETS:
        space = parse_space({}, name)
        assert space, name


def test_unknown_space_key_names_the_closest():
    with pytest.raises(ConfigError, match="optim.lr"):
        parse_space({"optim.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}})
    with pytest.raises(ConfigError, match="low < high"):
        parse_space({"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-5}})


def test_derived_keys_become_real_fields():
    out = to_overrides({"lora.r": 16, "lora.alpha_ratio": 2.0, "train.batch": "4x2"}, RunConfig())
    assert out == {"lora.r": 16, "lora.alpha": 32.0, "train.micro_batch_size": 4, "train.grad_accum": 2}


def test_study_runs_trials_records_failures_and_writes_outputs(tmp_path, data_file):
    space = {"optim.lr": {"type": "categorical", "choices": [1e-2, 3e-2]},
             "lora.targets": {"type": "categorical", "choices": ["attention", ["no_such_module"]]}}
    cfg = load_config(base_yaml(tmp_path, data_file, {"trials": 4, "sampler": "grid", "pruner": "none", "space": space}))
    result = run_tune(cfg)
    trials = result.study.trials
    assert len(trials) == 4  # the grid has exactly 4 points
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 2 and all("match no Linear module" in t.user_attrs["error"] for t in failed)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and all(t.user_attrs["steps"] == 4 for t in complete)
    study = result.study_dir
    for name in ["best.yaml", "trials.csv", "trials.md", "importances.json", "history.png", "summary.json"]:
        assert (study / name).exists(), name
    best = load_config(study / "best.yaml")
    assert best.optim.lr == result.best.params["optim.lr"] and best.lora.targets == "attention"
    assert (Path(result.best.user_attrs["run_dir"]) / "final" / "adapter_model.safetensors").exists()
    assert "no_such_module" in (study / "trials.md").read_text()


def test_pruner_stops_a_trial_worse_than_the_median(tmp_path, data_file):
    # lr=1e-7 learns nothing and loses to the lr=3e-2 trial's loss at the first evaluation.
    space = {"optim.lr": {"type": "categorical", "choices": [3e-2, 1e-7]}}
    cfg = load_config(base_yaml(tmp_path, data_file, {"trials": 2, "sampler": "random", "pruner": "median",
                                                      "startup_trials": 0, "space": space}, max_steps=6))
    # the good trial must come first for the median to exist: enqueue the order explicitly
    study_dir = Path(cfg.tune.output)
    study_dir.mkdir(parents=True)
    st = optuna.create_study(study_name="study", storage=f"sqlite:///{study_dir / 'study.db'}", direction="minimize")
    st.enqueue_trial({"optim.lr": 3e-2})
    st.enqueue_trial({"optim.lr": 1e-7})
    result = run_tune(cfg)
    states = {t.params["optim.lr"]: t.state for t in result.study.trials}
    assert states[3e-2] == optuna.trial.TrialState.COMPLETE
    assert states[1e-7] == optuna.trial.TrialState.PRUNED
    pruned = [t for t in result.study.trials if t.state == optuna.trial.TrialState.PRUNED][0]
    assert pruned.user_attrs["steps"] < 6 and pruned.intermediate_values


def _tune_cli(config: Path, *args: str, faults: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstune.cli", "tune", str(config), *args],
                          env=dict(os.environ, DSTUNE_FAULTS=faults), capture_output=True, text=True, timeout=600)


def test_crash_loses_no_finished_trial_and_rerun_resumes(tmp_path, data_file):
    config = base_yaml(tmp_path, data_file, {"trials": 2, "sampler": "random", "pruner": "none",
                                             "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}})
    first = _tune_cli(config)
    assert first.returncode == 0, first.stderr[-2000:]
    killed = _tune_cli(config, "--trials", "4", faults="kill@step:2")
    assert killed.returncode != 0
    again = _tune_cli(config, "--trials", "4")
    assert again.returncode == 0, again.stderr[-2000:]
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    trials = study.trials
    stale = [t for t in trials if t.user_attrs.get("stale")]
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(stale) == 1 and stale[0].number == 2 and len(done) == 4
    assert [t.number for t in done[:2]] == [0, 1]  # the first run's trials are kept as they were
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on loopback for this module (CI installs the server package)."""
    if os.environ.get("DSTUNE_TEST_POSTGRES_URL"):
        yield os.environ["DSTUNE_TEST_POSTGRES_URL"]
        return
    bindir = next((Path(p).parent for p in [shutil.which("initdb") or ""] if p), None)
    if bindir is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        bindir = candidates[-1].parent if candidates else None
    if bindir is None:
        if os.environ.get("CI"):  # CI must run this test, never skip it
            pytest.fail("CI has no PostgreSQL server binaries: .ci/run should have installed them")
        pytest.skip("no PostgreSQL server binaries here; .ci/run installs them (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="dstune-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                             "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"], check=True, capture_output=True)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        yield url
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgres_study(tmp_path, data_file, postgres_url):
    config = base_yaml(tmp_path, data_file, {"trials": 6, "sampler": "random", "pruner": "none",
                                             "study_name": f"two-workers-{os.getpid()}",
                                             "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}})
    cmd = [sys.executable, "-m", "dstune.cli", "tune", str(config), "--storage", postgres_url]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-1500:] for o in outs)
    study = optuna.load_study(study_name=f"two-workers-{os.getpid()}", storage=postgres_url)
    trials = study.trials
    assert len(trials) == 6  # exact: no worker started a 7th
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(6))
    assert len({t.user_attrs["run_dir"] for t in trials}) == 6  # no trial ran twice
    pids = {w.pid for w in workers}
    seen = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials}
    assert seen == pids, f"both workers should have run trials: {seen} vs {pids}"
