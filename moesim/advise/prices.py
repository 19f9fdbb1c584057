"""GPU hourly prices: the sourced table in prices.yaml, with a user's own price winning."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import InputError

PRICES_FILE = Path(__file__).with_name("prices.yaml")


@lru_cache(maxsize=1)
def price_table() -> dict[str, dict]:
    """profile name -> {price_per_hour, date, source}."""
    return yaml.safe_load(PRICES_FILE.read_text())


def price_for(profile: str, own: float | None = None, field: str = "hardware") -> tuple[float, str]:
    """(USD per GPU-hour, where it comes from) for a hardware profile; `own` wins."""
    if own is not None:
        return own, "your price"
    row = price_table().get(Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile)
    if row is None:
        raise InputError(f"no price for {profile!r} in {PRICES_FILE.name} (priced: {', '.join(price_table())}); "
                         "give price_per_hour for it", field=field)
    return float(row["price_per_hour"]), f"{row['source'].split(',')[0]} ({row['date']})"
