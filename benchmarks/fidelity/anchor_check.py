"""Re-simulate every CPU fidelity row with the disk anchored at the median of its profile's own
expert-read measurements in every context (back to back, in the size sweep, interleaved with idle
gaps, on the load-slowdown loader) instead of the back-to-back one. A diagnostic:

    python benchmarks/fidelity/anchor_check.py [ROW,ROW,...]   # prints row, contexts, anchor, error as tabled, error re-anchored
"""
import json
import statistics as st
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

OUT = Path(tempfile.mkdtemp(prefix="moesim-anchor-"))
R = Path(__file__).resolve().parents[2]; F = R / 'benchmarks/fidelity'
d = pd.read_csv(F / 'fidelity.csv')
rows = sys.argv[1].split(',') if len(sys.argv) > 1 else list(d.row)
out = []
for _, r in d[d.row.isin(rows)].iterrows():
    prof = R / r.profile; meas = json.loads(prof.with_name(prof.stem + '.measurements.json').read_text())
    dk = meas['disk']; ctx = {'alone': dk['expert_read']['median']}
    if dk['expert_read_in_sweep']['bytes'] == dk['expert_read']['bytes']:
        ctx['sweep'] = dk['expert_read_in_sweep']['median']
    if 'idle_reads' in dk: ctx['interleaved'] = dk['idle_reads']['back_to_back']['median']
    ls = meas.get('runtime', {}).get('load_slowdown')
    if ls: ctx['loader'] = ls['alone']['read']['median']
    B = st.median(ctx.values())
    p = yaml.safe_load(prof.read_text()); lat = p['disk']['latency_us']; eb = dk['expert_read']['bytes']
    p['disk']['read_bandwidth_gbps'] = eb / (B * 1e-3 - lat * 1e-6) / 1e9
    v = OUT / (r.row + '.yaml'); v.write_text(yaml.safe_dump(p, sort_keys=False))
    key = 'olmoe' if r.row.startswith('olmoe') else 'qwen'
    cap = r.row.split('-c')[1].split('-')[0]
    o = OUT / 'sim' / r.row
    cmd = ['moesim', 'replay', str(F / f'scenarios/{key}.yaml'), '--scale', '0.25', '--set', f'predictor.name={r.predictor}',
           '--set', f'cache.gpu.capacity_experts={cap}', '--set', f'batch.size={r.batch}', '--quiet', '--hardware', str(v),
           '--set', f'runtime={prof.with_name(prof.stem + ".runtime.yaml")}', '-o', str(o)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=R)
    m = json.loads((o / 'summary.json').read_text())['makespan_s']
    e = m / r.makespan_s_real - 1
    out.append((r.row, {k: round(x, 3) for k, x in ctx.items()}, round(B, 3), f"{r.makespan_s_err:+.1%}", f"{e:+.1%}"))
    print(*out[-1], flush=True)
