"""Launch a sweep described by YAML with submitit (Slurm job array, or local processes).

    python launchers/sweep.py configs/sweeps/train_ratio_beta.yaml [key=value ...] [--no-wait]

See lsm_dist/sweep.py for the file format. Results land in <run_dir>/results.md and .csv.
"""

from __future__ import annotations

import argparse
import sys

from lsm_dist.config import ConfigError
from lsm_dist.sweep import load_sweep, run_sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep YAML")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file (e.g. executor=local)")
    ap.add_argument("--no-wait", action="store_true", help="submit and return")
    args = ap.parse_args(argv)
    try:
        cfg = load_sweep(args.sweep, args.overrides)
        rows = run_sweep(cfg, wait=not args.no_wait)
    except (ConfigError, RuntimeError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 1
    for r in rows:
        print(r)
    if rows:
        print(f"table: {cfg.run_dir}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
