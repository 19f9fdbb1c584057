"""Sweeps: grid/zip/repeats expansion of a base scenario, run on pluggable executors, resumable.

    from moesim.sweep import load_sweep, get_executor, run_sweep
    spec = load_sweep("scenarios/whatif-cache-batch.yaml")
    outcome = run_sweep(spec, "reports/whatif", get_executor("local", workers=4))

See `spec` for the file format and `runner` for the files a sweep writes.
"""
from .executors import EXECUTORS, Executor, executor_names, get_executor, register_executor
from .runner import SweepOutcome, headline, run_sweep, write_tables
from .spec import Point, SweepSpec, expand, load_sweep, point_id, sweep_from_dict
from .worker import PointTask, run_point

__all__ = ["EXECUTORS", "Executor", "Point", "PointTask", "SweepOutcome", "SweepSpec", "executor_names", "expand",
           "get_executor", "headline", "load_sweep", "point_id", "register_executor", "run_point", "run_sweep",
           "sweep_from_dict", "write_tables"]
