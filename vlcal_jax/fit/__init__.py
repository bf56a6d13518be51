"""Ahead-of-time fit check of an RL run on a TPU slice: `python -m vlcal_jax.fit` (see __main__)."""

from vlcal_jax.fit.costs import Cost
from vlcal_jax.fit.memory import Live, Resident
from vlcal_jax.fit.programs import Compiled, Setup, Sizes
from vlcal_jax.fit.topology import CHIPS, SLICES, Chip, Slice

__all__ = ["CHIPS", "SLICES", "Chip", "Compiled", "Cost", "Live", "Resident", "Setup", "Sizes", "Slice"]
