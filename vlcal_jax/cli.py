"""The command-line entry of the package's tools (evaluate, predict, probe, readout)."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable


def run(main: Callable[[], Any], *, log: bool = True) -> None:
    """Calls `main()`; a missing file or a bad value (FileNotFoundError, ValueError) is printed as
    one `error:` line on stderr with exit status 2, not a traceback. `log`: INFO logging to stderr
    (without jax's "Unable to initialize backend 'tpu'" on CPU)."""
    if log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("jax._src").setLevel(logging.WARNING)
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
