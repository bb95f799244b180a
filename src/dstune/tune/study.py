"""``dstune tune``: an optuna study whose trials are ordinary runs of the one ``train()``.

Trials are created with ask/tell under a study-wide lock, so several workers (processes, machines)
sharing one storage run exactly ``tune.trials`` trials between them: the lock is an advisory lock in
PostgreSQL and a file lock for SQLite. A trial whose worker died (its process is gone) is marked
failed and does not count, so running the command again finishes the study with no finished trial
lost and none run twice.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import socket
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
from optuna.trial import TrialState
from rich.console import Console

from dstune.config import ConfigError, RunConfig, save_config
from dstune.quiet import output_console
from dstune.rundir import RunDir
from dstune.tune.space import Domain, default_preset, parse_space, suggest, to_overrides

# WAITING trials (enqueued, e.g. by hand) are not counted: the next ask() runs them.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


@dataclass
class TuneResult:
    """The outcome of a search: the study, where it lives, and the best trial."""

    study: optuna.Study
    study_dir: Path
    best: optuna.trial.FrozenTrial | None
    best_config: Path | None


class _GridSampler(optuna.samplers.GridSampler):
    """optuna's grid sampler, minus its ``study.stop()`` when the grid is exhausted: that call only works
    inside ``study.optimize``, and we drive trials with ask/tell (the trial count is capped at the grid
    size instead, in ``run_tune``)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


class ObjectiveError(ConfigError):
    """``tune.objective`` names no metric the evaluation produces: every trial would fail the same way,
    so the search stops at the first one instead of recording the same failure ``tune.trials`` times."""


def grid_size(space: dict[str, Domain]) -> int:
    """Number of points of the grid over ``space``."""
    return math.prod(len(d.grid()) for d in space.values())


class _TrialSeeded(optuna.samplers.BaseSampler):
    """Makes a sampler's random draws for trial N a function of (seed, N), not of how many trials this
    process sampled before.

    optuna's samplers keep one random stream per process, seeded once: a resumed study, or a second worker
    on a shared study, starts that stream again and repeats the first trials' configurations (random search
    resumed at trial 2 drew trial 0's learning rate again; two workers with the same seed drew the same
    sequence). optuna's own ``reseed_rng()`` reseeds from the OS, which would lose reproducibility; so before
    each trial every random stream of the wrapped sampler (its own and its start-up sampler's) is reseeded
    from the seed and the trial number. Model-based proposals still depend on the finished trials.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int) -> None:
        self.inner, self.seed = inner, seed

    def before_trial(self, study, trial) -> None:
        for i, state in enumerate(_random_states(self.inner)):
            state.seed([self.seed % 2**32, trial.number, i])
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def _random_states(sampler: optuna.samplers.BaseSampler, depth: int = 0) -> list:
    """The numpy random states a sampler draws from: its own and those of samplers it holds (TPE's, GP's and
    CMA-ES's start-up sampler), in attribute order. optuna keeps them in private ``LazyRandomState``
    attributes; tests/test_tune.py pins the behaviour that depends on finding them."""
    states = []
    for value in vars(sampler).values():
        rng = getattr(value, "rng", None)
        if isinstance(rng, np.random.RandomState):
            states.append(rng)
        elif isinstance(value, optuna.samplers.BaseSampler) and depth < 2:
            states.extend(_random_states(value, depth + 1))
    return states


class _Exploring(optuna.samplers.BaseSampler):
    """TPE that draws an evenly spaced share of its trials after the start-up ones at random (BOHB's "random
    fraction": Falkner et al. 2018 draw a third of Hyperband's configurations at random beside their TPE-like
    model).

    With optuna's good share (the best tenth of the trials) TPE settles around the best start-up trial in a
    budget of a few dozen trials; the random trials keep exploring and feed the model, which uses every
    finished trial whoever proposed it. Which trials are random is a function of the trial number alone, so
    it is the same for every worker of a shared study and for a resumed one. Off by default
    (``tune.random_fraction: 0``): measured with the tenth, on bench_tune's six seeds a third of random trials
    did worse on validation loss and better on the held-out test split, both by about 0.01
    (docs/benchmarks.md). ``tune.tpe_gamma`` (a quarter by default) widens the good set instead.
    """

    def __init__(
        self,
        model: optuna.samplers.BaseSampler,
        random: optuna.samplers.BaseSampler,
        startup: int,
        fraction: float,
    ) -> None:
        self.model, self.random, self.startup, self.fraction = model, random, startup, fraction

    def explores(self, number: int) -> bool:
        """Trial ``number`` is drawn at random: one in every 1/fraction trials after the start-up ones."""
        k = number - self.startup
        return k >= 0 and math.floor((k + 1) * self.fraction + 1e-9) > math.floor(k * self.fraction + 1e-9)

    def before_trial(self, study, trial) -> None:
        if self.explores(trial.number):
            study._storage.set_trial_system_attr(trial._trial_id, "dstune:sampled", "random")
        self.model.before_trial(study, trial)
        self.random.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return {} if self.explores(trial.number) else self.model.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return {} if self.explores(trial.number) else self.model.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        inner = self.random if self.explores(trial.number) else self.model
        return inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.model.after_trial(study, trial, state, values)
        self.random.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.model.reseed_rng()
        self.random.reseed_rng()


def _sampler(tc, space: dict[str, Domain]) -> optuna.samplers.BaseSampler:
    return _TrialSeeded(_unseeded_sampler(tc, space), tc.seed)


def _unseeded_sampler(tc, space: dict[str, Domain]) -> optuna.samplers.BaseSampler:
    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tc.seed)
    if tc.sampler == "grid":
        grid = {k: [",".join(v) if isinstance(v, list) else v for v in d.grid()] for k, d in space.items()}
        return _GridSampler(grid, seed=tc.seed)
    if tc.sampler == "gp":
        return optuna.samplers.GPSampler(seed=tc.seed, n_startup_trials=tc.startup_trials)
    if tc.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=tc.seed, n_startup_trials=tc.startup_trials)
    # multivariate TPE models interactions (lr with r, say), which independent TPE cannot. Its "good" share
    # (tune.tpe_gamma): optuna's default, the best tenth, is two or three trials in a 32-trial study, and
    # bench_tune saw it settle on the early best (docs/benchmarks.md). optuna 4.9 deprecated the argument
    # (removal planned for 6.0, hence the pin in pyproject.toml); the warning says only that.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`gamma` has been deprecated", category=FutureWarning)
        tpe = optuna.samplers.TPESampler(
            seed=tc.seed,
            n_startup_trials=tc.startup_trials,
            multivariate=True,
            gamma=functools.partial(_good_set, tc.tpe_gamma) if tc.tpe_gamma else None,
        )
    if not tc.random_fraction:
        return tpe
    return _Exploring(
        tpe, optuna.samplers.RandomSampler(seed=tc.seed + 1), tc.startup_trials, tc.random_fraction
    )


def _good_set(share: float, n: int) -> int:
    """How many of n trials TPE fits its 'good' density to: optuna's default_gamma with another share."""
    return min(math.ceil(share * n), 25)


def _pruner(tc, max_steps: int) -> optuna.pruners.BasePruner:
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=0)
    # The first pruning decision comes after a quarter of the trial's steps by default: earlier, a trial is
    # judged inside its warmup on a loss that has barely moved. bench_tune with optuna's 1% rule (first rung
    # at step 1 of 8) pruned a trial whose loss at step 4 beat every final loss of the study.
    first = tc.min_resource or max(1, max_steps // 4)
    if tc.pruner == "asha":
        # optuna's min_resource="auto" is read off the first *finished* trial, so that trial never records
        # its rung values and the second trial meets no competitor: it always survives, however bad (seen in
        # bench_tune). The trial budget is known here, so it is set up front.
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=tc.reduction_factor
        )
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=max_steps, reduction_factor=tc.reduction_factor
        )
    return optuna.pruners.NopPruner()


def _storage_url(tc, study_dir: Path) -> str:
    return tc.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"


@contextmanager
def study_lock(url: str, name: str) -> Iterator[None]:
    """Serialises trial creation across workers: PostgreSQL advisory lock, or a file lock for SQLite."""
    if url.startswith("sqlite:///"):
        lock_path = Path(url[len("sqlite:///") :] + ".lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"dstune:{name}".encode())
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    raise ConfigError(
        f"tune.storage: '{url.split(':', 1)[0]}' is not supported; use a SQLite file "
        "(sqlite:///path.db) or PostgreSQL (postgresql://user:pass@host/db)"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_dead_workers(study: optuna.Study) -> None:
    """Marks RUNNING trials of dead processes on this host as failed and not counted (``stale``)."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, w_pid = worker.rpartition(":")
        if w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid)):
            study._storage.set_trial_user_attr(t._trial_id, "stale", True)
            study._storage.set_trial_user_attr(t._trial_id, "error", "its worker process died; not counted")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _claim(study: optuna.Study, url: str, name: str, total: int) -> optuna.Trial | None:
    with study_lock(url, name):
        _fail_dead_workers(study)
        trials = study.get_trials(deepcopy=False)
        counted = [
            t
            for t in trials
            if t.state in COUNTED or (t.state == TrialState.FAIL and not t.user_attrs.get("stale"))
        ]
        if len(counted) >= total:
            return None
        trial = study.ask()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return trial


def _steps_done(run_dir: Path) -> int:
    path = RunDir(run_dir).metrics
    if not path.exists():
        return 0
    steps = [
        json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return max(steps, default=0)


def trial_config(base: RunConfig, values: dict[str, Any], run_dir: Path) -> RunConfig:
    """The run config of one trial: the base config with the sampled values and its own directory."""
    data = base.model_dump(mode="json")
    from dstune.config import apply_override

    for key, value in to_overrides(values, base).items():
        apply_override(data, key, value)
    data["output"] = str(run_dir)
    if base.tune.max_steps:
        data["train"]["max_steps"] = base.tune.max_steps
    return RunConfig.model_validate(data)


class DeliveredMetrics:
    """The validation metrics of the weights a trial would deliver if it stopped now.

    Without ``regularize.keep_best`` a run delivers its last weights: the latest evaluation. With it, the
    run delivers the weights of its best evaluation by ``train.best_metric`` (EarlyStopping's rule, reused
    here), and its objective is theirs; the pruner must then see those too. Judged on the latest value, a
    trial whose loss dips and rises again (a high learning rate on a short run) is pruned for a rise its
    result does not have.
    """

    def __init__(self, cfg: RunConfig):
        from dstune.train.regularize import EarlyStopping

        self.rule = None
        if cfg.regularize.keep_best:
            # keep_best off in the copy: the rule is only asked which evaluation is best, no weights are kept
            rule_cfg = cfg.regularize.model_copy(update={"keep_best": False, "early_stop_patience": 0})
            self.rule = EarlyStopping(rule_cfg, cfg.train.best_metric, cfg.best_metric_sign())
        self.kept: dict[str, float] | None = None

    def __call__(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        if self.rule is None:
            return metrics
        self.rule.update(step, metrics, model=None)
        if self.kept is None or self.rule.best_step == step:
            self.kept = metrics
        return self.kept


def run_trial(
    trial: optuna.Trial,
    base: RunConfig,
    space: dict[str, Domain],
    study_dir: Path,
    objective: str,
    console: Console,
) -> None:
    """Runs one trial to the end, reporting validation metrics so the pruner can stop it early."""
    from dstune.train.loop import train
    from dstune.train.signals import TrainingInterrupted

    run_dir = study_dir / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    values = suggest(trial, space)
    final_step = base.tune.max_steps or base.train.max_steps or float("inf")
    delivered = None
    reported: set[int] = set()

    def report(step: int, metrics: dict[str, float]) -> None:
        if objective not in metrics:
            raise ObjectiveError(
                f"tune.objective: '{objective}' is not a validation metric; available: {sorted(metrics)}"
            )
        kept = delivered(step, metrics)[objective]
        if step in reported:  # keep_best re-validates the kept weights at the last step: already reported
            return
        reported.add(step)
        trial.report(kept, step)
        # The last evaluation ends the trial anyway: pruning there would discard a finished result.
        if step < final_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({objective}={kept:.4g})")

    started = time.perf_counter()
    state, value = TrialState.FAIL, None
    try:
        cfg = trial_config(base, values, run_dir)
        delivered = DeliveredMetrics(cfg)
        result = train(cfg, console=Console(quiet=True), on_eval=report)
        # A halted run returns normally (its last good weights are saved), but it diverged: a failure.
        halt = (result.summary.get("stability") or {}).get("halt")
        if halt:
            raise RuntimeError(f"halted by the stability guard: {halt['message']}")
        value = result.val.get(objective)
        if value is None or not math.isfinite(value):
            raise ValueError(f"the run ended without a finite '{objective}' (got {value}); diverged?")
        state = TrialState.COMPLETE
    except optuna.TrialPruned as exc:
        state = TrialState.PRUNED
        trial.set_user_attr("pruned", str(exc))
    except ObjectiveError as exc:
        trial.set_user_attr("error", str(exc))
        trial.study.tell(trial, None, state=TrialState.FAIL)
        raise
    except TrainingInterrupted:
        # SIGTERM/SIGINT (Ctrl-C) stops the search, not just this trial; the trial is not counted, so
        # running the command again runs it anew (as for a worker that died).
        trial.set_user_attr("stale", True)
        trial.set_user_attr("error", "interrupted by a signal; not counted")
        trial.set_user_attr("steps", _steps_done(run_dir))
        trial.study.tell(trial, None, state=TrialState.FAIL)
        raise
    except Exception as exc:  # any failure is recorded with its reason and the search goes on
        trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    trial.set_user_attr("steps", _steps_done(run_dir))
    trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
    if RunDir(run_dir).data_report.is_file():  # trials train quietly: their data warning is said here
        warning = RunDir(run_dir).read_json(RunDir.DATA_REPORT).get("warning")
        if warning:
            trial.set_user_attr("data_warning", warning)
    trial.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    shown = (
        f"{value:.4f}"
        if value is not None
        else trial.user_attrs.get("error", trial.user_attrs.get("pruned", ""))
    )
    console.print(f"trial {trial.number}: {state.name.lower()} {shown}  {values}", highlight=False)


def run_tune(cfg: RunConfig, *, console: Console | None = None, trials: int | None = None) -> TuneResult:
    """Runs (or resumes, or joins) the study described by ``cfg.tune``.

    Args:
        cfg: base run config; ``cfg.tune`` holds the search settings.
        trials: overrides ``cfg.tune.trials``.

    Returns:
        TuneResult; the study directory holds best.yaml, trials.csv/.md, importances and plots.
    """
    console = console or output_console()
    tc = cfg.tune
    total = trials or tc.trials
    preset = tc.preset
    if not preset and not tc.space:
        preset = default_preset(cfg.method)
        console.print(
            f"search space: tune.preset={preset} (the default for method={cfg.method}; set tune.preset "
            f"or tune.space to choose)",
            highlight=False,
        )
    space = parse_space(tc.space, preset)
    if tc.sampler == "grid" and total > grid_size(space):
        console.print(
            f"the grid has {grid_size(space)} points: running {grid_size(space)} trials, not {total}"
        )
        total = grid_size(space)
    if tc.pruner != "none" and not cfg.train.eval_every:
        # The pruner needs intermediate results: 8 evaluations per trial give ASHA's rungs (a quarter of the
        # steps, then x reduction_factor) an evaluation at or just after each of them.
        every = max(1, (tc.max_steps or cfg.train.max_steps or 1000) // 8)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": every})})
        console.print(
            f"tune.pruner={tc.pruner} needs evaluations during each trial: train.eval_every={every}",
            highlight=False,
        )
    study_dir = Path(tc.output)
    study_dir.mkdir(parents=True, exist_ok=True)
    name = tc.study_name or study_dir.resolve().name
    direction = tc.direction or ("minimize" if tc.objective in ("loss", "ppl") else "maximize")
    url = _storage_url(tc, study_dir)
    save_config(cfg, study_dir / "base.yaml")
    max_steps = tc.max_steps or cfg.train.max_steps or 1000
    # Under the lock: two workers starting at once would both create optuna's tables (a known race:
    # "duplicate key value violates unique constraint" on CREATE TYPE studydirection).
    with study_lock(url, name):
        study = optuna.create_study(
            study_name=name,
            storage=url,
            direction=direction,
            load_if_exists=True,
            sampler=_sampler(tc, space),
            pruner=_pruner(tc, max_steps),
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console.print(
        f"study '{name}' in {url.split('@')[-1]}: {total} trials, {tc.sampler} sampler, "
        f"{tc.pruner} pruner, {direction} {tc.objective}"
    )
    started = time.perf_counter()
    said: set[str] = set()
    while tc.timeout is None or time.perf_counter() - started < tc.timeout:
        trial = _claim(study, url, name, total)
        if trial is None:
            break
        run_trial(trial, cfg, space, study_dir, tc.objective, console)
        warning = trial.user_attrs.get("data_warning")
        if warning and warning not in said:
            console.print(warning, style="yellow", markup=False, highlight=False)
            said.add(warning)

    from dstune.tune.report import write_outputs

    best_cfg = write_outputs(study, cfg, study_dir, console)
    best = study.best_trial if best_cfg else None
    if best_cfg and tc.retrain:
        _retrain(best_cfg, study_dir, console)
    return TuneResult(study, study_dir, best, best_cfg)


def _retrain(best_config: Path, study_dir: Path, console: Console) -> None:
    """Retrains the best configuration on train+val (the test split stays held out)."""
    from dstune.config import load_config
    from dstune.train.loop import train

    cfg = load_config(best_config)  # config.py refuses tune.retrain with a data.validation file up front
    train_r, val_r, test_r = cfg.data.split
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"split": (train_r + val_r, 0.0, test_r)}),
            "output": str(study_dir / "best-retrained"),
            "train": cfg.train.model_copy(update={"eval_every": 0}),
        }
    )
    console.print(f"retraining the best configuration on train+val into {cfg.output}")
    train(cfg, console=console)
