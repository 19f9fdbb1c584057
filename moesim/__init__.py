"""moesim: simulate MoE inference with offloaded experts."""
from .version import __version__  # noqa: F401  (re-exported)


def load_scenario(path, overrides=()):
    """Load and validate a scenario YAML (see moesim.config)."""
    from .config import load_scenario as _load

    return _load(path, overrides)


def simulate(scenario, record_events: bool = False):
    """Run a scenario; returns a Result with `.summary` (dict) and `.steps` (DataFrame)."""
    from .engine.run import simulate as _simulate

    return _simulate(scenario, record_events)
