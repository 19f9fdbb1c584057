"""Registry of predictors by the name a user types in YAML (`predictor.name`)."""
from __future__ import annotations

import numpy as np

from ..models import ModelSpec
from .base import Predictor

_REGISTRY: dict[str, type[Predictor]] = {}


def register(cls: type[Predictor]) -> type[Predictor]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Predictor]:
    return _REGISTRY[name]  # KeyError for an unknown name


def validate(name: str, params: dict):
    """Check the parameters without building the predictor (pydantic ValidationError if bad)."""
    return get(name).Params(**params)


def create(name: str, params: dict, model: ModelSpec, rng: np.random.Generator) -> Predictor:
    cls = get(name)
    return cls(cls.Params(**params), model, rng)
