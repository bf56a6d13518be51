"""vlcal_jax: VL-Calibration in JAX (see README.md)."""

import logging

__version__ = "0.1.0"


class _DropMissingTorchNotice(logging.Filter):
    """transformers announces at import that PyTorch is missing; vlcal_jax uses it only for
    tokenizers and configs, which need no torch, so the notice would only alarm users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


# The notice is logged on the "transformers" logger itself when transformers is first imported
# (lazily, by processing.load_tokenizer); a filter there drops that one message and nothing else.
logging.getLogger("transformers").addFilter(_DropMissingTorchNotice())
