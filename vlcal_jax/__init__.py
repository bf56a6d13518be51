"""vlcal_jax: VL-Calibration in JAX (see README.md)."""

__version__ = "0.1.0"
