"""`moesim hardware list|show`: the shipped hardware profiles."""
from __future__ import annotations

import click

from moesim.cli.util import guard as _guard


@click.group()
def hardware():
    """Hardware profiles (hardware_profiles/*.yaml)."""


@hardware.command("list")
@_guard
def hardware_list():
    """List the profiles in hardware_profiles/ with their GPU, PCIe, HBM and compute figures."""
    from moesim.hardware.profile import list_profiles, load_profile

    for n in list_profiles():
        p = load_profile(n)
        click.echo(f"{n:20s} {p.gpu.name:28s} PCIe {p.pcie_h2d.bandwidth_gbps:g} GB/s, "
                   f"HBM {p.gpu.hbm_bandwidth_gbps:g} GB/s, "
                   f"{p.gpu.peak_bf16_tflops:g} TFLOP/s")


@hardware.command("show")
@click.argument("name")
@_guard
def hardware_show(name):
    """Print a profile with every number's source."""
    import yaml

    from moesim.hardware.profile import load_profile

    click.echo(yaml.safe_dump(load_profile(name).model_dump(mode="json", exclude_none=True), sort_keys=False))
