"""`python -m fcnjax.train --config experiments/quickstart.py [--workdir runs/quickstart]`.

Trains, or resumes, the run in --workdir (fcnjax.training.train_and_evaluate) over every device of every process.
"""
from __future__ import annotations

import json

import jax
from absl import flags
from ml_collections import config_flags

from fcnjax import cli, parallel, training

config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and predictions; the same workdir resumes. "
                    "Default: runs/<config file name>.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}


def main(argv):
  del argv
  workdir = FLAGS.workdir or cli.default_workdir(FLAGS["config"].config_filename)
  parallel.initialize_distributed()
  summary = training.train_and_evaluate(FLAGS.config, workdir, cli.executables_dir())
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2))
  if summary.get("signal") in EXIT_CODES:
    raise SystemExit(EXIT_CODES[summary["signal"]])


if __name__ == "__main__":
  cli.run(main)
