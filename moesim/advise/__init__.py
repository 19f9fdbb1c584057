"""Deployment advice: an optuna search over cache, policy, predictor, batching and GPU under an SLO
(`search`), on the sweep executors, and one-at-a-time bottleneck what-ifs around a run (`whatif`).

    from moesim.advise import load_advise, run_search, write_outputs
    from moesim.sweep import get_executor
    spec = load_advise("advise.yaml")
    doc = write_outputs(run_search(spec, "reports/advise", get_executor("local")), spec, "reports/advise")
"""
from .outputs import write_outputs
from .search import run_search
from .spec import AdviseSpec, advise_from_dict, load_advise

__all__ = ["AdviseSpec", "advise_from_dict", "load_advise", "run_search", "write_outputs"]
