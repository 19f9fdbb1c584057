"""The deployment search: optuna asks for configurations, the sweep executors simulate them.

Each configuration is a sweep point of one base scenario (`DIR/points/<id>/`), so a configuration
the sampler asks for twice is simulated once, and an interrupted search resumes: the optuna study
lives in `DIR/optuna.journal`, trials left running are evaluated again (their points are usually
done already), and finished points are never rerun. A configuration is pruned without simulating
when it cannot be built (a cache below top_k) or when a closed-form bound (`bounds`) shows it
cannot meet the SLO or beat the best configuration found so far.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import apply_overrides, scenario_from_dict
from ..errors import InputError
from ..sweep.executors import Executor
from ..sweep.runner import make_tasks
from ..sweep.spec import Point, SweepSpec, override_strings, point_id
from ..sweep.worker import clean_stale_tmp, is_done, read_status
from . import bounds
from .objective import DIRECTIONS, better, metrics, objective_direction, objective_value
from .prices import price_for
from .space import Infeasible, Space
from .spec import AdviseSpec

JOURNAL = "optuna.journal"
ASK_LIMIT = 5  # stop after this many asks per simulation of the budget (pruned and repeated ones are free)
CANNOT_BUILD = 1e6  # the constraint value of a configuration that cannot be built
PRICED = ("tokens_per_dollar", "cost_per_hour", "price_per_hour")
POINTS = "points"


@dataclass
class Evaluated:
    """A trial's outcome before it is told to optuna."""

    state: str                      # complete | pruned | fail
    config: dict
    point_id: str | None = None
    metrics: dict | None = None
    reason: str | None = None
    violation: float | None = None  # pruned as infeasible: how far past the SLO (ranks it for the sampler)


@dataclass
class SearchOutcome:
    study: object
    space: Space
    simulated: set[str] = field(default_factory=set)   # point ids simulated by this process


def make_sampler(spec: AdviseSpec, space: Space):
    import optuna

    s = spec.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=min(8, max(1, s.trials // 3)),
                                          multivariate=True)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=min(16, max(4, s.trials // 3)))
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)

    class Grid(optuna.samplers.GridSampler):
        """GridSampler without its Study.stop() on exhaustion, which works only inside
        study.optimize; the ask-and-tell loop checks is_exhausted itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(space.grid(), seed=s.seed)


def open_study(spec: AdviseSpec, space: Space, outdir: Path):
    """The study in `outdir/optuna.journal` (created, or loaded to resume)."""
    try:
        import optuna
    except ImportError:
        raise InputError("moesim advise needs optuna, which is not installed: pip install 'moesim[advise]'",
                         field="advise") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(outdir / JOURNAL)))
    keys = spec.search.pareto if spec.search.sampler == "nsga2" else [None]
    directions = [DIRECTIONS[k] if k else objective_direction(spec) for k in keys]
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec, space),
                                directions=directions, load_if_exists=True)
    h = spec_hash(spec)
    if not study.trials:
        study.set_user_attr("spec_hash", h)
        study.enqueue_trial(space.params(spec.default_config), user_attrs={"default": True})
    elif study.user_attrs.get("spec_hash") != h:
        raise InputError("holds a search of a different advise file (only search.trials may change to resume): "
                         "use another -o or delete it", file=str(outdir), field=JOURNAL)
    return study


def spec_hash(spec: AdviseSpec) -> str:
    """What a resumed search must share with the first run: everything but the budget and the dir."""
    import hashlib

    d = spec.model_dump(mode="json", exclude={"output": True, "search": {"trials"}})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Search:
    """One search: ask a batch, prune or simulate it on the executor, tell the results."""

    def __init__(self, spec: AdviseSpec, outdir: Path, executor: Executor, file: str | None = None,
                 echo: Callable[[str], None] = lambda m: None):
        self.spec, self.out, self.executor, self.echo = spec, Path(outdir), executor, echo
        self.space = Space(spec, file)
        self.base = self.space.base()
        self.sweep = SweepSpec(name=spec.name, base=self.base, base_dir=spec.base_dir, file=file)
        self.pdir = self.out / POINTS
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.simulated: set[str] = set()
        self.best: float | None = None
        self.batch_size = max(1, executor.workers or os.cpu_count() or 1)
        self.file = file
        for i, c in enumerate(spec.hardware):
            try:
                self.space.profile(c.profile)
            except InputError as e:
                raise InputError(e.detail, file=file, field=f"hardware[{i}]") from None
        self.prices = self._prices()

    # ---- one configuration ----

    def scenario(self, overrides: dict):
        data = apply_overrides(self.base, override_strings(overrides))
        return scenario_from_dict(data, base_dir=Path(self.spec.base_dir))

    def price(self, hw: str) -> float | None:
        return self.prices[hw]

    def _prices(self) -> dict[str, float | None]:
        """Each candidate's price; a missing one is an error only when the objective needs prices."""
        s = self.spec
        needs = s.objective != "tokens_per_s" or any(k in PRICED for k in s.search.pareto)
        out = {}
        for i, c in enumerate(s.hardware):
            try:
                out[c.profile] = price_for(c.profile, c.price_per_hour)[0]
            except InputError as e:
                if needs:
                    raise InputError(e.detail, file=self.file, field=f"hardware[{i}].price_per_hour") from None
                out[c.profile] = None
        return out

    def prepare(self, config: dict) -> tuple[Evaluated, dict | None]:
        """(outcome so far, overrides to simulate or None when pruned)."""
        try:
            ov = self.space.overrides(config)
            sc = self.scenario(ov)
        except Infeasible as e:
            return Evaluated("pruned", config, reason=str(e), violation=CANNOT_BUILD), None
        except InputError as e:
            if (e.field or "").startswith("cache."):  # the cache or the experts do not fit this GPU's host
                return Evaluated("pruned", config, reason=f"does not fit: {e.detail}", violation=CANNOT_BUILD), None
            raise InputError(f"configuration {config}: {e}", file=self.file, field="space") from None
        why, violation = self.hopeless(sc, ov["hardware"])
        if why:
            return Evaluated("pruned", config, point_id(ov), reason=why, violation=violation), None
        return Evaluated("complete", config, point_id(ov)), ov

    def hopeless(self, sc, hw: str) -> tuple[str | None, float | None]:
        """(why a bound rules the configuration out, or None; its SLO violation when it is that)."""
        slo = self.spec.slo
        lb = bounds.tpot_ms_lower_bound(sc)
        if slo.tpot_ms is not None and lb is not None and lb > slo.tpot_ms:
            return f"TPOT >= {lb:.1f} ms by the compute bound, over the {slo.tpot_ms:g} ms SLO", lb / slo.tpot_ms - 1
        ub = bounds.tokens_per_s_upper_bound(sc)
        if ub is None or self.best is None:
            return None, None
        fake = metrics({"tokens_per_s": ub}, self.spec, self.price(hw))
        v = objective_value(fake, self.spec)
        if not better(v, self.best, self.spec):
            return f"at most {v:.4g} {self.spec.objective} by the compute bound, not better than {self.best:.4g}", None
        return None, None

    def finish(self, ev: Evaluated) -> Evaluated:
        """Read a simulated point's summary into metrics (or mark it failed)."""
        d = self.pdir / ev.point_id
        st = read_status(d) or {}
        if st.get("status") != "done":
            ev.state, ev.reason = "fail", st.get("error") or "point did not finish"
            return ev
        summary = json.loads((d / "summary.json").read_text())
        ev.metrics = metrics(summary, self.spec, self.price(ev.config.get("hardware",
                                                                            self.spec.hardware[0].profile)))
        if ev.metrics["slo_ok"]:
            v = objective_value(ev.metrics, self.spec)
            if self.best is None or better(v, self.best, self.spec):
                self.best = v
        return ev

    # ---- a batch ----

    def evaluate(self, configs: list[dict]) -> list[Evaluated]:
        prepared = [self.prepare(c) for c in configs]
        points, seen = [], set()
        for ev, ov in prepared:
            if ov is None or ev.point_id in seen:
                continue
            seen.add(ev.point_id)
            p = Point(ev.point_id, len(points), ov)
            if not is_done(self.pdir / p.id, self.sweep.scenario_hash(p)):
                points.append(p)
        tasks = make_tasks(self.sweep, points, self.run_id)
        self.executor.run(tasks, self.pdir, lambda st: None)
        self.simulated.update(p.id for p in points)
        return [self.finish(ev) if ov is not None else ev for ev, ov in prepared]

    def tell(self, study, trial, ev: Evaluated) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("config", json.dumps(ev.config, sort_keys=True))
        if ev.point_id:
            trial.set_user_attr("point_id", ev.point_id)
        if ev.reason:
            trial.set_user_attr("reason", ev.reason)
        n_slo = len(metrics({}, self.spec, None)["slo_excess"])
        if ev.violation is not None:  # infeasible: ranked behind every simulated trial, by how far
            for i in range(n_slo):
                trial.set_constraint(f"slo{i}", ev.violation)
        if ev.state != "complete":
            study.tell(trial, state=TrialState.PRUNED if ev.state == "pruned" else TrialState.FAIL)
            return
        m = ev.metrics
        trial.set_user_attr("metrics", json.dumps(m, sort_keys=True, default=float))
        for i, x in enumerate(m["slo_excess"]):  # feasible when <= 0: TPE and NSGA-II prefer those
            trial.set_constraint(f"slo{i}", x)
        keys = self.spec.search.pareto if len(study.directions) > 1 else None
        study.tell(trial, [m[k] for k in keys] if keys else objective_value(m, self.spec))

    def run(self) -> SearchOutcome:
        import optuna

        self.out.mkdir(parents=True, exist_ok=True)
        self.pdir.mkdir(exist_ok=True)
        clean_stale_tmp(self.pdir)
        study = open_study(self.spec, self.space, self.out)
        self._replay(study)
        left = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        if left:  # asked but never told (an interrupted run): evaluate them again
            self.echo(f"resuming: {len(left)} trial(s) left running")
            trials = [optuna.trial.Trial(study, t._trial_id) for t in left]
            self._batch(study, trials)
        dists = self.space.distributions()
        budget = self.spec.search.trials
        while True:
            trials = study.get_trials(deepcopy=False)
            n = min(self.batch_size, budget - simulations(trials))
            if n <= 0 or len(trials) >= ASK_LIMIT * budget:
                break
            self._batch(study, [study.ask(dists) for _ in range(n)])
            if self.spec.search.sampler == "grid" and study.sampler.is_exhausted(study):
                break
        return SearchOutcome(study, self.space, self.simulated)

    def _batch(self, study, trials) -> None:
        configs = [self.space.config(t.params) for t in trials]
        for t, ev in zip(trials, self.evaluate(configs)):
            self.tell(study, t, ev)

    def _replay(self, study) -> None:
        """On resume: the best feasible objective of the trials already told (for pruning)."""
        for t in study.get_trials(deepcopy=False):
            m = json.loads(t.user_attrs.get("metrics", "null") or "null")
            if m and m.get("slo_ok"):
                v = objective_value(m, self.spec)
                if self.best is None or better(v, self.best, self.spec):
                    self.best = v


def simulations(trials) -> int:
    """Distinct configurations simulated (done or failed) among finished trials."""
    from optuna.trial import TrialState

    return len({t.user_attrs.get("point_id") for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)})


def run_search(spec: AdviseSpec, outdir: str | Path, executor: Executor, file: str | None = None,
               echo: Callable[[str], None] = lambda m: None) -> SearchOutcome:
    return Search(spec, Path(outdir), executor, file, echo).run()
