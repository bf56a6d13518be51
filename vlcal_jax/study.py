"""The scene study CLI: the paper's ablation ladder on the scene world, from one warm start, over seeds.

    python -m vlcal_jax.study --config experiments/scene_study.py [--config.seeds=0, ...]

The study itself (stages, probes, table, plot) is `vlcal_jax.training.study.run_study`.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from vlcal_jax.training import logs, study

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file (experiments/scene_study.py)")


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config experiments/scene_study.py")
    logs.setup_logging()
    study.run_study(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
