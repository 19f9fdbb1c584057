"""Pluggable expert predictors, registered under the name used in YAML."""
from . import simple  # noqa: F401  (registers on_demand, oracle)
from .base import Predictor, PredictorParams, Prefetch
from .registry import create, get, names, register

__all__ = ["Predictor", "PredictorParams", "Prefetch", "create", "get", "names", "register"]
