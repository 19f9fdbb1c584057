"""The checks of a scenario against the registries it names things from: eviction policies (`cache.policies`)
and predictors with their parameters (`predictors.registry`).

`config` is the bottom layer and imports neither registry; it loads this module by name when it checks a
scenario (`config.REGISTRY_CHECKS`), the way a plug-in is found, so a bad name is still an InputError naming the
file and the field, before anything is written."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from .cache.policies import POLICIES
from .errors import InputError, pydantic_message
from .predictors import registry

if TYPE_CHECKING:
    from .config import Scenario


def check_policies(sc: Scenario, file: str | None) -> None:
    """Each cache tier's eviction policy is registered, and an admission filter is not put before Belady."""
    for tier_name in ("gpu", "dram"):
        tier = getattr(sc.cache, tier_name)
        if tier is None:
            continue
        field = f"cache.{tier_name}"
        if tier.policy not in POLICIES:
            raise InputError(f"unknown eviction policy {tier.policy!r} (known: {', '.join(sorted(POLICIES))})",
                             file=file, field=f"{field}.policy")
        if tier.admission != "none" and POLICIES[tier.policy].needs_next_use:
            raise InputError(f"{tier.policy} is the offline optimum: an admission filter does not apply",
                             file=file, field=f"{field}.admission")


def check_predictor(sc: Scenario, file: str | None) -> None:
    """The predictor is registered and its parameters are valid for it."""
    try:
        registry.validate(sc.predictor.name, sc.predictor.params)
    except KeyError:
        raise InputError(f"unknown predictor {sc.predictor.name!r} (known: {', '.join(registry.names())})",
                         file=file, field="predictor.name") from None
    except ValidationError as e:
        raise pydantic_message(e, file=file, prefix="predictor") from None


CHECKS = (check_policies, check_predictor)
