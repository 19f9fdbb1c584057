"""What-if: the evicted expert's write-back, which moesim does not model, as a halved link.

mixtral-offloading's `ExpertCache._swap` (dvmazur/mixtral-offloading@0d3c605, src/expert_cache.py)
copies the loaded expert host->device AND the evicted expert device->host, both `non_blocking` on
the current stream, so the two copies run one after the other: every miss moves the expert's bytes
twice over PCIe. moesim has no field for that (it copies in only). Halving the profile's H2D
bandwidth for every point doubles the time of each expert copy, which is what the serialised
write-back does when D2H runs at the H2D rate; it is a stand-in, not a measured link speed.

    PYTHONPATH=$PWD python benchmarks/published/writeback_whatif.py [POINTS.yaml ...] [-o DIR]

Each points file is rewritten with the override into DIR and fitted with `moesim calibrate`, whose
table is printed as is (default: every *.points.yaml here).
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml

from moesim.config import load_scenario

HERE = Path(__file__).resolve().parent
KEY = "hardware.pcie_h2d.bandwidth_gbps"


def with_writeback(points_file: Path) -> dict:
    """The points file with every point's H2D bandwidth halved and its scenario path made absolute."""
    spec = yaml.safe_load(points_file.read_text())
    for p in spec["points"]:
        scenario = (points_file.parent / p["scenario"]).resolve()
        link = load_scenario(scenario).hardware.pcie_h2d.bandwidth_gbps
        p["scenario"] = str(scenario)
        p["set"] = {**(p.get("set") or {}), KEY: link / 2}
    spec["name"] += "-writeback"
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("points", nargs="*", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("/tmp/published-writeback"))
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for pf in args.points or sorted(HERE.glob("*.points.yaml")):
        spec = with_writeback(pf)
        out = args.output / f"{spec['name']}.points.yaml"
        out.write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"\n## {pf.name} with the write-back stand-in ({KEY} halved)", flush=True)
        subprocess.run(["moesim", "calibrate", str(out), "-o", str(out.with_suffix("").with_suffix(".runtime.yaml"))],
                       check=True)


if __name__ == "__main__":
    main()
