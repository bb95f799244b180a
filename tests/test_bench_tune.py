"""The benchmark scripts that read bench_tune's output: bench_tune_test (each search's pick on the held-out
test split) and bench_tune_replay (dstune's pruner replayed on finished curves)."""

import json
import math
from pathlib import Path

import pytest


def _benchmark(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~40 s: two small searches, then both picks reloaded and scored
def test_bench_tune_test_rescoring_reproduces_the_search_and_refuses_other_weights(tmp_path):
    runs = tmp_path / "runs"
    assert _benchmark("bench_tune").main(["--model", "tiny:deepseek-llm", "--rows", "60", "--max-length", "96",
                                          "--trials", "3", "--steps", "4", "--eval-every", "2", "--startup", "2",
                                          "--seeds", "0", "--out", str(runs)]) == 0
    scorer = _benchmark("bench_tune_test")
    assert scorer.main([str(runs), "--json", str(tmp_path / "t.json")]) == 0
    seed = json.loads((tmp_path / "t.json").read_text())["seeds"][0]
    for name, sampler in [("random, no pruning", "random"), ("TPE + ASHA", "tpe")]:
        res = seed["searches"][name]
        summary = json.loads((runs / "seed0" / sampler / "summary.json").read_text())
        assert res["best_trial"] == summary["best_trial"]
        assert res["val_loss"] == pytest.approx(summary["best_value"], abs=1e-4)
        assert res["test_rows"] == 6 and math.isfinite(res["test_loss"]) and res["test_loss"] != res["val_loss"]
    # a summary that does not belong to the trial's weights is refused, not scored
    path = runs / "seed0" / "tpe" / "summary.json"
    summary = json.loads(path.read_text())
    summary["best_value"] += 0.01
    path.write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="not the trial's data or weights"):
        scorer.main([str(runs)])


def test_bench_tune_replay_runs_dstunes_pruner_on_finished_curves(tmp_path):
    # Four full curves (evaluations every 4 of 16 steps): the first trial always runs to the end; ASHA's first
    # decision (step 4, a quarter) stops a trial unless it is the best at that rung so far, as optuna rules
    # while fewer than 3 trials have reached it. Trial 3 is worst at step 4 but best at the end: pruning
    # loses it, which is what the replay exists to show.
    study = tmp_path / "runs" / "seed0" / "random"
    study.mkdir(parents=True)
    curves = {0: [2.0, 1.9, 1.8, 1.7], 1: [2.1, 1.8, 1.7, 1.6], 2: [1.95, 1.85, 1.75, 1.65], 3: [2.3, 1.7, 1.5, 1.4]}
    with open(study / "trials.csv", "w", encoding="utf-8") as fh:
        fh.write("trial,state,value\n" + "".join(f"{n},complete,{c[-1]}\n" for n, c in curves.items()))
    for n, c in curves.items():
        (study / f"trial-{n:04d}").mkdir()
        (study / f"trial-{n:04d}" / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 4 * (i + 1), "split": "val", "loss": v}) + "\n" for i, v in enumerate(c)))
    (study / "summary.json").write_text("{}")
    replay = _benchmark("bench_tune_replay")
    assert replay.main([str(tmp_path / "runs"), "--asha", "3:0", "3:8", "--json", str(tmp_path / "r.json")]) == 0
    seed = json.loads((tmp_path / "r.json").read_text())["seeds"][0]
    assert (seed["random_best_trial"], seed["random_best_value"]) == (3, 1.4)
    quarter, eight = seed["replays"]
    assert (quarter["best_trial"], quarter["steps"], quarter["finished"]) == (2, 16 + 4 + 16 + 4, 2)
    # first decision at step 8: trials 1 (1.8 < 1.9) and 3 (1.7) are the best there so far and go on; trial 2
    # (1.85) is not, and with three trials at the rung the best third is one trial
    assert (eight["best_trial"], eight["steps"], eight["finished"]) == (3, 16 + 16 + 8 + 16, 3)
