"""Shared pytest set-up: float32 CPU JAX, deterministic, offline."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent XLA compilation cache for the trainer runs the tests start in subprocesses and
# kernels (the README demo, its resumed runs after SIGKILL / SIGTERM, the Colab notebook): they
# compile the same programs, and a resumed run would otherwise recompile everything. Cached
# executables are the compiled ones, so results are unchanged; the in-process tests (whose JAX
# read its configuration at import) do not use it. `subprocess_cache_env()` is what they add.
_CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vlcal_test_xla_cache_{os.getpid()}")


def subprocess_cache_env() -> dict[str, str]:
    return {"JAX_COMPILATION_CACHE_DIR": _CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on a 2-core CI box; opt in with VLCAL_SLOW_TESTS=1")
