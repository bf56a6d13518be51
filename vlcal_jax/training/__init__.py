"""Pieces of the training CLI (vlcal_jax.train): data, model, warm start, eval, logs, checkpoints."""
