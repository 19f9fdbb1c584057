"""Pluggable expert predictors, registered under the name used in YAML."""
from . import simple  # noqa: F401  (registers on_demand, oracle)
from . import topk  # noqa: F401  (registers topk)
from . import multilook  # noqa: F401  (registers multilook)
from . import intelligent  # noqa: F401  (registers intelligent)
from . import noisy_oracle  # noqa: F401  (registers noisy_oracle)
from . import activation_matrix  # noqa: F401  (registers activation_matrix)
from . import neural  # noqa: F401  (registers speculation, pre_attention; torch is imported lazily)
from .base import Predictor, PredictorParams, Prefetch
from .registry import create, get, names, register

__all__ = ["Predictor", "PredictorParams", "Prefetch", "create", "get", "names", "register"]
