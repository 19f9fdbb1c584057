"""`moesim schema` and `moesim models`: the scenario JSON Schema and the model presets."""
from __future__ import annotations

import json

import click


@click.command()
def schema():
    """Print the scenario JSON Schema (for editors)."""
    from moesim.config import scenario_json_schema

    click.echo(json.dumps(scenario_json_schema(), indent=2))


# ---- models and hardware -------------------------------------------------------------------------

@click.command()
def models():
    """List model presets with their key shapes and source."""
    from rich.console import Console
    from rich.table import Table

    from moesim.models import get_preset, preset_names

    t = Table(title="model presets")
    for c in ("name", "MoE layers", "experts", "top-k", "shared", "hidden", "expert ffn", "expert MB", "source"):
        t.add_column(c)
    for n in preset_names():
        m = get_preset(n)
        t.add_row(n, str(m.num_layers), str(m.num_experts), str(m.top_k), str(m.num_shared_experts),
                  str(m.hidden_size), str(m.expert_intermediate_size), f"{m.expert_bytes / 1e6:.1f}", m.source)
    Console(width=200).print(t)
