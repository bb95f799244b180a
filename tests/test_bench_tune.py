"""The benchmark scripts that read bench_tune's output: bench_tune_test (each search's pick on the held-out
test split), bench_tune_replay (dstune's pruner replayed on finished curves) and bench_tune_odds (a search
against every random search of the same size that a longer random search holds)."""

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


def test_bench_tune_odds_equals_enumerating_every_random_subset():
    # The closed forms against the definition: every 3-subset of 7 random trials is a 3-trial random search.
    from itertools import combinations

    odds = _benchmark("bench_tune_odds")
    values = [1.9, 1.7, 1.7, 2.4, math.inf, 1.8, 1.75]  # a tie and a failed trial
    subsets = [min(s) for s in combinations(values, 3)]
    assert odds.expected_best(values, 3) == pytest.approx(sum(subsets) / len(subsets))
    for x in (1.6, 1.7, 1.72, 1.8, 2.5):
        assert odds.chance_at_least_as_good(values, x, 3) == pytest.approx(
            sum(x <= m for m in subsets) / len(subsets))
    assert odds.chance_at_least_as_good(values, 1.7, 3) == 1.0  # a tie counts as at least as good


def _study(path: Path, rows: list[tuple[str, float | None, int]], direction: str = "minimize") -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"direction": direction}))
    with open(path / "trials.csv", "w", encoding="utf-8") as fh:
        fh.write("trial,state,value,steps\n" + "".join(
            f"{n},{state},{'' if v is None else v},{steps}\n" for n, (state, v, steps) in enumerate(rows)))


def test_bench_tune_odds_reads_the_studies_and_refuses_too_few_random_trials(tmp_path):
    rnd = [("complete", v, 16) for v in (2.0, 1.8, 1.9, 1.6)] + [("fail", None, 3)]
    _study(tmp_path / "r" / "seed0" / "random", rnd)
    # the other search: its first 2 trials count (1.85 finished, one pruned); the third is past N
    _study(tmp_path / "t" / "seed0" / "tpe", [("complete", 1.85, 16), ("pruned", 1.7, 4), ("complete", 1.0, 16)])
    odds = _benchmark("bench_tune_odds")
    out = tmp_path / "odds.json"
    assert odds.main([str(tmp_path / "r"), str(tmp_path / "t"), "--trials", "2", "--json", str(out)]) == 0
    seed = json.loads(out.read_text())["seeds"][0]
    # 2-subsets of (2.0, 1.8, 1.9, 1.6, inf) whose min is >= 1.85: {2.0, 1.9, inf} choose 2 = 3 of 10
    assert seed["best"] == 1.85 and seed["chance_at_least_as_good"] == pytest.approx(0.3)
    assert (seed["steps"], seed["random_steps"], seed["random_first_n_best"]) == (20, 32, 1.8)
    # a maximised objective (F1): higher is better, so 1.85 now beats {1.8, 1.6, failed} choose 2 = 3 of 10
    _study(tmp_path / "rmax" / "seed0" / "random", rnd, direction="maximize")
    assert odds.main([str(tmp_path / "rmax"), str(tmp_path / "t"), "--trials", "2", "--json", str(out)]) == 0
    seed = json.loads(out.read_text())["seeds"][0]
    assert seed["chance_at_least_as_good"] == pytest.approx(0.3)
    assert seed["random_expected_best"] == pytest.approx((2.0 * 4 + 1.9 * 3 + 1.8 * 2 + 1.6) / 10)
    with pytest.raises(SystemExit, match="5 random trials; need more than 5"):
        odds.main([str(tmp_path / "r"), str(tmp_path / "t"), "--trials", "5"])


def test_bench_tune_replay_halves_match_random_search_when_pruning_loses_nothing():
    # Curves that keep their order at every evaluation: ASHA never stops the best trial of its half, so random
    # search + ASHA is at least as good as the other half exactly when the overall best trial falls in its
    # half, which a random split does half of the time; and it spends fewer steps.
    replay = _benchmark("bench_tune_replay")
    trials = [(n, {4 * (i + 1): 3.0 - 0.1 * i + 0.01 * n for i in range(4)}) for n in range(12)]
    res = replay.halves(trials, reduction_factor=3, min_resource=None, k=400, seed=0)
    assert res["trials_per_search"] == 6 and res["splits"] == 400
    assert 0.4 < res["chance_at_least_as_good"] < 0.6
    assert res["mean_step_ratio"] < 0.9
    # reversed at the end (the worst at step 4 finishes best): pruning now loses the best trial in some splits
    flipped = [(n, {**c, 16: 1.0 - 0.01 * n}) for n, c in trials]
    assert replay.halves(flipped, 3, None, k=400, seed=0)["chance_at_least_as_good"] < 0.4
