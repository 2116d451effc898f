#!/usr/bin/env python
"""Build (or reuse) the small-model zoo and print a table of its models.

    python tools/build_zoo.py [--config configs/zoo/default.yaml] [--force] [--no-progress]
                              [key=value ...]        # e.g. out_dir=/tmp/zoo eval_samples=32

Overrides are dotted ``ZooConfig`` keys (``--help-config`` lists them). Models whose
``zoo_card.json`` hash matches their spec are reused without training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsm_dist.config import ConfigError, describe  # noqa: E402
from lsm_dist.zoo.build import ZooConfig, build_zoo, format_zoo_table, load_zoo_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/zoo/default.yaml", help="zoo YAML")
    ap.add_argument("--force", action="store_true", help="rebuild even models whose card matches")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    ap.add_argument("--help-config", action="store_true", help="list the config keys and exit")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    if args.help_config:
        print("\n".join(describe(ZooConfig)))
        return 0
    try:
        cfg = load_zoo_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    paths = build_zoo(cfg, progress=not args.no_progress, force=args.force)
    print(format_zoo_table(paths))
    print(f"\n{len(paths)} models in {cfg.out_dir} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
