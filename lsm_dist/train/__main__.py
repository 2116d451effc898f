"""``python -m lsm_dist.train [--config FILE] [key=value ...]`` (also under ``torchrun`` /
``accelerate launch``) and ``python -m lsm_dist.train export RUN_DIR [--checkpoint DIR]``."""

from __future__ import annotations

import argparse
import json
import sys

from lsm_dist.config import ConfigError, describe, resolved_yaml
from lsm_dist.corpus.convert import CorpusError
from lsm_dist.dist import read_env
from lsm_dist.errors import os_error_message
from lsm_dist.model import VAECheckpointError
from lsm_dist.train.checkpointing import CheckpointError, export_vae
from lsm_dist.train.config import TrainConfig, load_train_config
from lsm_dist.train.loop import TrainingDiverged, run_train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="python -m lsm_dist.train export")
        p.add_argument("run_dir")
        p.add_argument("--checkpoint", help="step directory (default: newest complete one)")
        p.add_argument("--out", help="output directory (default: RUN_DIR/vae)")
        a = p.parse_args(argv[1:])
        try:
            print(export_vae(a.run_dir, a.checkpoint, a.out))
        except (CheckpointError, VAECheckpointError, FileNotFoundError) as e:
            print(f"lsm train export: error: {e}", file=sys.stderr)
            return 1
        except (OSError, RuntimeError) as e:
            if (msg := os_error_message(e)) is None:
                raise
            print(f"lsm train export: error: {msg}", file=sys.stderr)
            return 1
        return 0
    p = argparse.ArgumentParser(prog="python -m lsm_dist.train")
    p.add_argument("--config", "-c", help="YAML config (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch_size=64 model.d_model=256")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("--dry-run", action="store_true", help="check the config, print it resolved and exit")
    a = p.parse_args(argv)
    if a.help_config:
        print("\n".join(describe(TrainConfig)))
        return 0
    try:
        cfg = load_train_config(a.config, a.overrides)
        if a.dry_run:
            print(resolved_yaml(cfg), end="")
            return 0
        result = run_train(cfg)
    except ConfigError as e:
        print(f"lsm train: invalid config: {e}", file=sys.stderr)
        return 2
    except (CorpusError, CheckpointError, TrainingDiverged, FileNotFoundError) as e:
        print(f"lsm train: error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:  # disk full, symlink loops: a line, not a traceback
        if (msg := os_error_message(e)) is None:
            raise
        print(f"lsm train: error: {msg}", file=sys.stderr)
        return 1
    if read_env().rank == 0:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("perf/")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
