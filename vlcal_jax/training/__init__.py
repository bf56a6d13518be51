"""A training run (vlcal_jax.train is its CLI): the stages and the GRPO loop (loop), data, model,
warm start, evaluation, logs, checkpoints and the HF-format model directory (export)."""
