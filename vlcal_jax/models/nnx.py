"""A `flax.nnx` view of the pure-functional Qwen3-VL, for code built on nnx modules (tunix).

`Qwen3VL` holds our params pytree as `nnx.Param`s, one attribute per top-level key ("visual",
"text", and "lm_head" when the head is untied), so `nnx.state(model)` has exactly the paths
of the params pytree (the partition rules of `vlcal_jax.parallel` read them the same way).
Its `__call__` runs `qwen3_vl.forward` / `qwen3_vl.apply` on those values: the model is
implemented once, in the pure functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlcal_jax.models import checkpoint, qwen3_vl
from vlcal_jax.models.config import ModelConfig


class Qwen3VL(nnx.Module):
    """Qwen3-VL as an `nnx.Module`: `Qwen3VL(config, params)` or `Qwen3VL.from_pretrained(path)`.

    `nnx.split(model)` -> (graphdef, state); `params_from_state(state)` (or `model.to_params()`)
    is our params pytree, and `nnx.merge(graphdef, state)` rebuilds the module.
    """

    def __init__(self, config: ModelConfig, params: dict):
        self.config = config
        for name, tree in params.items():
            if hasattr(self, name):
                raise ValueError(f"params key {name!r} clashes with a Qwen3VL attribute; expected the keys of "
                                 "models.init_params / models.from_pretrained ('visual', 'text', 'lm_head')")
            setattr(self, name, nnx.data(jax.tree.map(nnx.Param, tree)))

    @classmethod
    def from_pretrained(cls, path: str, dtype=jnp.float32) -> Qwen3VL:
        """From an HF checkpoint directory, as `models.from_pretrained(path, dtype)`."""
        return cls(*checkpoint.from_pretrained(path, dtype=dtype))

    def to_params(self) -> dict:
        """Our params pytree (the current values of the module's `nnx.Param`s)."""
        return params_from_state(nnx.state(self, nnx.Param))

    def save_pretrained(self, out_dir: str, **kwargs) -> None:
        """An HF checkpoint transformers can load, as `models.save_pretrained`."""
        checkpoint.save_pretrained(self.config, self.to_params(), out_dir, **kwargs)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                 patch_bucket: int | None = None) -> jax.Array:
        """logits float32 [B, T, V], as `models.forward` for a processor-format batch.

        `input_ids` may instead be prepared `ModelInputs` (`models.prepare_inputs`, on the host):
        the form to pass as traced data through `nnx.jit` / `nnx.grad`, since the 3-D rotary
        positions of a processor-format batch are computed on the host from concrete token ids.
        """
        params = self.to_params()
        if isinstance(input_ids, qwen3_vl.ModelInputs):
            if any(x is not None for x in (attention_mask, pixel_values, image_grid_thw, patch_bucket)):
                raise ValueError("prepared ModelInputs already hold the mask, the images and their patch bucket; "
                                 "pass them alone")
            qwen3_vl.check_inputs(self.config, input_ids)
            return qwen3_vl.apply(self.config, params, input_ids)
        return qwen3_vl.forward(self.config, params, input_ids, attention_mask, pixel_values, image_grid_thw,
                                patch_bucket=patch_bucket)


def params_from_state(state: nnx.State) -> dict:
    """Our params pytree from the `nnx.State` of a `Qwen3VL` (`nnx.split` / `nnx.state`)."""
    return nnx.to_pure_dict(state)
