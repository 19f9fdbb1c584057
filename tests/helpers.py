"""Shared test helpers (the hand-made model, fixed-time profile and trace writer live in
moesim.validate, which `moesim validate` uses too)."""
from moesim.validate import TINY_MODEL, fixed_profile, tiny_scenario as scenario, write_routing  # noqa: F401
