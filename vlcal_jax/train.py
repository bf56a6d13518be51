"""VL-Calibration training CLI.

    python -m vlcal_jax.train --config experiments/cpu_demo.py [--config.rl.steps=20 ...]

Flags and logging; the run itself (stages, GRPO loop, checkpoints, export) is
`vlcal_jax.training.loop.run`.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from vlcal_jax.training import logs, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)")
# multi-process runs (every process runs the same command); on a TPU pod all three are discovered
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (or VLCAL_COORDINATOR)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job (or VLCAL_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (or VLCAL_PROCESS_ID)")


def parse_flags(argv):
    """absl flag parsing, with a `--config.` override of a key the config does not have reported
    as that override (its full path and the config's suggestion), not a traceback."""
    try:
        return flags.FLAGS(argv)
    except AttributeError as e:  # ml_collections: a locked ConfigDict refuses an unknown key
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        leaf = message.split("'")[1] if message.count("'") >= 2 else ""
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if o.rsplit(".", 1)[-1] == leaf] or overrides
        key = named[0][len("config."):] if named else "?"
        raise SystemExit(f"FATAL --config.{key}: the config has no key {key!r} ({message}). Overrides can "
                         "only set keys the config file defines; see experiments/*.py and vlcal_jax/configs.py.")


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config experiments/cpu_demo.py")
    for flag, name in ((_COORDINATOR, "VLCAL_COORDINATOR"), (_NUM_PROCESSES, "VLCAL_NUM_PROCESSES"),
                       (_PROCESS_ID, "VLCAL_PROCESS_ID")):
        if flag.value is not None:  # read by parallel.initialize, which loop.run calls first
            os.environ[name] = str(flag.value)
    logs.setup_logging()
    loop.run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
