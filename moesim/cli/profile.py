"""`moesim profile -o PROFILE.yaml [--model olmoe-1b-7b] [--scale F] [--quick] [--device auto]`:
measure this machine into a hardware profile. torch is imported only when it runs.

`python -m moesim.cli.profile profile|replay|compare ...` runs the measuring commands without the rest of the CLI."""
from __future__ import annotations

from pathlib import Path

import click

from moesim.cli.replay import DTYPE_CHOICES, compare, replay
from moesim.cli.util import guard as _guard
from moesim.errors import InputError


# ---- profile -------------------------------------------------------------------------------------

@click.command("profile")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="profile YAML to write (a NAME.measurements.json with every sample's spread goes beside it)")
@click.option("--model", "model_name", default="olmoe-1b-7b", show_default=True,
              help="model preset whose expert and attention shapes are measured")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="scale the model's FFN widths as `moesim replay --scale` does (the tables are for that model)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="bfloat16", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
@click.option("--quick", is_flag=True, help="fewer points and repeats: under a minute (for CI)")
@click.option("--disk-dir", type=click.Path(file_okay=False), default=None,
              help="where to write the disk test file (default: the output's directory)")
@click.option("--io", type=click.Choice(["auto", "odirect", "fadvise"]), default="auto", show_default=True,
              help="how disk reads bypass the page cache")
@click.option("--context", type=int, default=128, show_default=True,
              help="cached positions (KV length) per sequence at the decode-shaped attention points: the "
                   "points of at most 16 new tokens, one per sequence (larger points are prefills)")
@click.option("--name", default=None, help="profile name (default: the output file's stem)")
@click.option("--section", type=click.Choice(["all", "host_cpu"]), default="all", show_default=True,
              help="host_cpu: measure only the host CPU as an expert executor (bfloat16 and float32) and add "
                   "it to the existing profile -o")
@click.option("--quiet", is_flag=True)
@_guard
def profile(output, model_name, scale, device, dtype, threads, quick, disk_dir, io, context, name, section, quiet):
    """Measure this machine into a hardware profile with `measured` tables.

    Expert FFN time by tokens per expert and attention time by tokens for the model's shapes, disk
    reads of expert-sized blocks with the page cache bypassed, and the link: host-to-device copies
    (pinned and pageable, 1 and 2 streams) on CUDA, host memcpy on a CPU-only machine. Medians of
    repeated, warmed-up runs; the spread is in the YAML comments and the .measurements.json.
    """
    from moesim.models import get_preset, preset_names
    from moesim.real.profiler import run_profile

    try:
        spec = get_preset(model_name)
    except KeyError:
        raise InputError(f"unknown model preset {model_name!r} (known: {', '.join(preset_names())})",
                         field="--model") from None
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    out = Path(output)
    if context < 1:
        raise InputError(f"must be >= 1, got {context}", field="--context")
    if section == "host_cpu":
        from moesim.real.cpu_profile import add_host_cpu, measure_host_cpu

        sec, meas = measure_host_cpu(spec, scale, threads, quick, log=log)
        add_host_cpu(out, sec, meas)
        for dt, tab in sec["expert_ms"].items():
            click.echo(f"host CPU expert FFN {dt}: " + "  ".join(
                f"{t:g}:{m:.3g}ms" for t, m in zip(tab["tokens"], tab["ms"])))
        click.echo(f"added host_cpu to {out}")
        return
    res = run_profile(spec, out, scale=scale, device=device, dtype=dtype, threads=threads, quick=quick,
                      disk_dir=disk_dir, io=io, name=name, context=context, log=log)
    if not quiet:
        click.echo(res.summary_text())
    click.echo(f"wrote {out} and {res.sidecar}")


COMMANDS = [profile, replay, compare]


def _standalone_group():
    """`python -m moesim.cli.profile profile|replay|compare ...` (same as `moesim ...`)."""
    @click.group()
    def group():
        """moesim profile / replay / compare."""
    for c in COMMANDS:
        group.add_command(c)
    return group


if __name__ == "__main__":  # pragma: no cover
    _standalone_group()()
