"""What the search samplers draw: the same configurations when a study resumes, TPE's share of random
trials (``tune.random_fraction``) and the share of trials its good density is fitted to (``tune.tpe_gamma``).
These drive optuna directly on a cheap objective; no training."""

import math

import optuna
import pytest

from dstune.config import RunConfig
from dstune.tune.space import parse_space


@pytest.mark.parametrize("sampler", ["random", "tpe", "cmaes", "grid"])
def test_a_resumed_study_draws_what_an_uninterrupted_one_would(tmp_path, sampler):
    # optuna seeds one random stream per process: resumed (a new process, a new sampler), random search drew
    # trial 0's values again at trial 2. dstune seeds each trial's draws from (seed, trial number) instead.
    from dstune.tune.space import suggest
    from dstune.tune.study import _sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tc = RunConfig.model_validate({"tune": {"sampler": sampler, "seed": 7, "startup_trials": 2}}).tune
    lr = {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}
    if sampler == "grid":
        lr = {"type": "categorical", "choices": [1e-5, 1e-4, 1e-3, 1e-2]}
    space = parse_space({"optim.lr": lr, "lora.r": {"type": "categorical", "choices": [4, 8, 16, 32]}})

    def run(study_name: str, stops: list[int]) -> list[dict]:
        for n in stops:  # each stop is a new process: a new sampler on the stored study
            study = optuna.create_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'studies.db'}",
                                        sampler=_sampler(tc, space), load_if_exists=True)
            while len(study.trials) < n:
                trial = study.ask()
                values = suggest(trial, space)
                study.tell(trial, (math.log10(values["optim.lr"]) + 3) ** 2 + values["lora.r"] / 100)
        return [t.params for t in study.trials]

    whole = run("whole", [6])
    resumed = run("resumed", [2, 4, 6])
    assert resumed == whole
    assert len({tuple(p.values()) for p in whole}) == 6, whole  # no configuration drawn twice


def test_tpe_draws_every_third_trial_after_start_up_at_random_whatever_the_results(tmp_path):
    # tune.random_fraction: the marked trials come from a random sampler, so they are the same whatever the
    # objective; TPE's own trials follow the results and differ. Routing a marked trial to TPE fails this.
    from dstune.tune.report import trial_rows
    from dstune.tune.space import suggest
    from dstune.tune.study import _sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space({"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                         "lora.r": {"type": "categorical", "choices": [4, 8, 16, 32]}})

    def search(optimum: float, fraction: float) -> optuna.Study:
        tc = RunConfig.model_validate({"tune": {"seed": 3, "startup_trials": 3, "random_fraction": fraction}}).tune
        study = optuna.create_study(sampler=_sampler(tc, space))
        for _ in range(12):
            trial = study.ask()
            values = suggest(trial, space)
            study.tell(trial, (math.log10(values["optim.lr"]) - optimum) ** 2 + values["lora.r"] / 100)
        return study

    low, high = search(-4, 1 / 3), search(-2, 1 / 3)
    marked = [t.number for t in low.trials if t.system_attrs.get("dstune:sampled") == "random"]
    assert marked == [5, 8, 11]
    assert [t.number for t in high.trials if t.system_attrs.get("dstune:sampled") == "random"] == marked
    for n in marked:
        assert low.trials[n].params == high.trials[n].params
    guided = [n for n in range(3, 12) if n not in marked]
    # TPE's draws follow the results (with four finished trials it can still land on the same prior draw)
    assert sum(low.trials[n].params != high.trials[n].params for n in guided) >= len(guided) - 1
    assert [r["note"] for r in trial_rows(low)][5] == "drawn at random (tune.random_fraction)"
    # off: plain TPE, every post-start-up trial guided
    plain = search(-4, 0)
    assert not any(t.system_attrs.get("dstune:sampled") for t in plain.trials)
    assert plain.trials[5].params != low.trials[5].params
    with pytest.raises(ValueError, match="random_fraction"):
        RunConfig.model_validate({"tune": {"random_fraction": 1.5}})


def test_tpe_fits_its_good_density_to_a_quarter_of_the_trials_without_optunas_deprecation_warning():
    # tune.tpe_gamma: optuna's default good set, the best tenth, is 2 of 20 trials; dstune's quarter is 5.
    import warnings

    from dstune.tune.space import suggest
    from dstune.tune.study import _unseeded_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space({"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}})

    def tpe(**tune):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler = _unseeded_sampler(RunConfig.model_validate({"tune": {"seed": 1, **tune}}).tune, space)
        assert not [w for w in caught if "gamma" in str(w.message)], [str(w.message) for w in caught]
        return sampler

    assert [tpe()._gamma(n) for n in (8, 20, 32, 200)] == [2, 5, 8, 25]
    assert [tpe(tpe_gamma=0.1)._gamma(n) for n in (8, 20, 32, 200)] == [1, 2, 4, 20]
    assert tpe(tpe_gamma=None)._gamma is None  # optuna's own default, chosen when it first samples

    def draws(sampler) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        for _ in range(16):
            trial = study.ask()
            study.tell(trial, (math.log10(suggest(trial, space)["optim.lr"]) + 3) ** 2)
        return [t.params["optim.lr"] for t in study.trials]

    quarter, tenth = draws(tpe()), draws(tpe(tpe_gamma=0.1))
    assert quarter[:3] == tenth[:3]  # the start-up trials are random either way
    assert quarter[3:] != tenth[3:]
    with pytest.raises(ValueError, match="tpe_gamma"):
        RunConfig.model_validate({"tune": {"tpe_gamma": 0}})
