"""Package-level behaviour: what importing vlcal_jax does to the user's terminal."""

import os
import subprocess
import sys
import textwrap

NOTICE = "PyTorch was not found"


def _run_without_torch(tmp_path, code: str) -> str:
    """Runs `code` in a fresh interpreter in which `import torch` fails; returns stdout + stderr."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(__file__))])
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_no_missing_torch_notice_but_real_warnings_still_show(tmp_path):
    # Without vlcal_jax the notice is printed: the torch-hiding set-up works, so the test can fail.
    assert NOTICE in _run_without_torch(tmp_path, "import transformers")
    # The training entry point, then transformers as the tokenizer loads it; a real warning still shows.
    out = _run_without_torch(tmp_path, """
        import vlcal_jax.train
        from transformers import PreTrainedTokenizerFast
        from transformers.utils import logging
        logging.get_logger("transformers").warning("a real transformers warning")
    """)
    assert NOTICE not in out
    assert "a real transformers warning" in out
