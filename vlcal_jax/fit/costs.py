"""Analytic FLOPs and HBM bytes of the RL step's programs, and roofline times on a chip.

XLA's `cost_analysis()` counts a loop body once (the layer scan, the decode `while_loop`, the
micro-batch scan), so its FLOPs are low by the trip counts; these are counted by hand instead.

Model FLOPs (what MFU is measured against) of a forward pass, with D the text width, F the MLP
width, H/KV heads of size hd, L layers, V the vocabulary, Dv/Fv/Lv/Hv the vision tower's:
    per text token   L * (2 * (2 * D * H * hd + 2 * D * KV * hd + 3 * D * F) + 4 * ctx * H * hd)
                     ctx = T / 2 for causal self-attention over T tokens (the useful half),
                     Tp + m for decode step m (it attends to the prompt and m generated tokens)
    per head token   2 * D * V   (only where logits are computed: response tokens, sampled steps)
    per image        P * (2 * patch_dim * Dv + Lv * (2 * (4 * Dv^2 + 2 * Dv * Fv) + 4 * P * Dv))
                     + (1 + n_deepstack) * P / 4 * 2 * (W^2 + W * D),  W = 4 * Dv   (P patches)
The update is forward + backward = 3x the forward; remat recomputes the forward once more,
which the hardware does (time) but MFU does not count.

HBM bytes count weights, the KV cache and the optimizer state, not activations, so the times
are lower bounds: time = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip, with the
work split evenly over the chips (perfect FSDP). The update also counts what it moves off the
chip, overlapped with its compute as XLA schedules it (async collectives, offload copies):
FSDP's traffic over ICI (per micro-batch each chip receives (n - 1) / n of the compute-dtype
weights twice, gathered for the forward and again for the backward pass, and of the gradients
once, reduce-scattered) and, with remat offload, the layer inputs it copies to host memory and
back over PCIe, with the micro-batch's pixels when they wait in host memory.
"""

from __future__ import annotations

import dataclasses

from vlcal_jax.fit.topology import Chip
from vlcal_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Cost:
    """One program's work over the whole slice: model FLOPs, hardware FLOPs, and the HBM bytes
    one chip moves; `time` is a roofline lower bound in seconds."""

    model_flops: float
    hardware_flops: float
    bytes_per_chip: float
    time: float
    ici_bytes_per_chip: float = 0.0
    host_bytes_per_chip: float = 0.0
    bound: str = "compute"  # what the time is: "compute", "HBM", "ICI" or "host" (PCIe) bound

    def mfu(self, chip: Chip, chips: int) -> float:
        return self.model_flops / (self.time * chip.peak_flops * chips) if self.time else 0.0


def text_token_flops(config: ModelConfig, context: float) -> float:
    t = config.text
    d, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    matmuls = 2 * (2 * d * q + 2 * d * kv + 3 * d * t.intermediate_size)
    return t.num_hidden_layers * (matmuls + 4 * context * q)


def head_token_flops(config: ModelConfig) -> float:
    return 2 * config.text.hidden_size * config.text.vocab_size


def image_flops(config: ModelConfig, patches: int) -> float:
    v = config.vision
    dv, wide = v.hidden_size, v.hidden_size * v.merge_unit
    blocks = v.depth * (2 * (4 * dv * dv + 2 * dv * v.intermediate_size) + 4 * patches * dv)
    mergers = (1 + len(v.deepstack_visual_indexes)) * 2 * (wide * wide + wide * v.out_hidden_size) / v.merge_unit
    return patches * (2 * v.patch_dim * dv + blocks + mergers)


def forward_flops(config: ModelConfig, rows: int, length: int, images: int, patches: int, head_tokens: int) -> float:
    """One teacher-forced (or prefill) pass: `rows` x `length` tokens, `images` images."""
    return (rows * length * text_token_flops(config, length / 2) + images * image_flops(config, patches)
            + head_tokens * head_token_flops(config))


def _bound(flops: float, bytes_: float, ici_bytes: float, host_bytes: float, chip: Chip,
           chips: int) -> tuple[float, str]:
    times = {"compute": flops / chips / chip.peak_flops, "HBM": bytes_ / chip.hbm_bandwidth,
             "ICI": ici_bytes / chip.ici_bandwidth, "host": host_bytes / chip.host_bandwidth}
    name = max(times, key=times.get)
    return times[name], name


def _time(flops: float, bytes_: float, chip: Chip, chips: int) -> float:
    return _bound(flops, bytes_, 0, 0, chip, chips)[0]


def fsdp_bytes(weight_bytes: float, grad_bytes: float, shards: int) -> float:
    """Bytes one chip receives over ICI per micro-batch of the update under FSDP over `shards`
    chips: the compute-dtype weights all-gathered twice (forward; backward, which recomputes
    under remat) and the gradients reduce-scattered once (ring collectives)."""
    return (shards - 1) / shards * (2 * weight_bytes + grad_bytes) if shards > 1 else 0.0


def offload_bytes(config: ModelConfig, *, rows_per_chip: int, length: int, images_per_chip: int,
                  patches: int) -> float:
    """Bytes one chip copies over PCIe per micro-batch with `remat_offload`: every layer's input
    [rows, T, D] (and every vision block's [P, Dv] per image) out in the forward pass and back
    in the backward pass."""
    if not (config.remat and config.remat_offload):
        return 0.0
    t, v, size = config.text, config.vision, config.compute_dtype.itemsize
    per_pass = (t.num_hidden_layers * rows_per_chip * length * t.hidden_size
                + v.depth * images_per_chip * patches * v.hidden_size) * size
    return 2 * per_pass


def sampler(config: ModelConfig, chip: Chip, chips: int, *, prompts: int, samples: int, prompt_len: int,
            new_tokens: int, images: int, patches: int, weight_bytes: float, text_weight_bytes: float,
            kv_bytes_per_chip: float, decode_rows: int = 0) -> Cost:
    """Prefill of `prompts` prompts, then the decode steps of prompts x samples rows, every row
    running to the end (the worst case the programs are sized for): `new_tokens - 1` steps of
    all rows (the static engine), or of `decode_rows` slots taking the rows in turn (the
    continuous engine: ceil(rows / slots) times as many steps, each over fewer rows). Each decode
    step reads the gathered text weights and this chip's decoded KV cache `kv_bytes_per_chip`
    (it attends over the padded cache under a mask)."""
    rows = prompts * samples
    prefill = forward_flops(config, prompts, prompt_len, images, patches, head_tokens=prompts)
    per_step = min(decode_rows or rows, rows)
    steps = (new_tokens - 1) * -(-rows // per_step)
    mean_context = prompt_len + new_tokens / 2
    decode = steps * per_step * (text_token_flops(config, mean_context) + head_token_flops(config))
    step_time, bound = _bound(decode / max(steps, 1), text_weight_bytes + kv_bytes_per_chip, 0, 0, chip, chips)
    time = _time(prefill, weight_bytes, chip, chips) + steps * step_time
    return Cost(prefill + decode, prefill + decode, weight_bytes + steps * (text_weight_bytes + kv_bytes_per_chip),
                time, bound=bound)


def score(config: ModelConfig, chip: Chip, chips: int, *, rows: int, samples: int, length: int, response_len: int,
          images: int, patches: int, vce_k: int, weight_bytes: float) -> Cost:
    """Clean and K perturbed policy passes and the reference pass over `rows` responses; each
    perturbed pass runs the tower on one image copy per response (a fresh mask per response)."""
    clean = forward_flops(config, rows, length, images, patches, rows * response_len)
    perturbed = vce_k * forward_flops(config, rows, length, images * samples if images else 0, patches,
                                      rows * response_len)
    flops = 2 * clean + perturbed
    passes = 2 + vce_k
    time, bound = _bound(flops, passes * weight_bytes, 0, 0, chip, chips)
    return Cost(flops, flops, passes * weight_bytes, time, bound=bound)


def update(config: ModelConfig, chip: Chip, chips: int, *, rows: int, micro_batches: int, length: int,
           response_len: int, images: int, patches: int, weight_bytes: float, optimizer_bytes: float,
           ici_bytes: float = 0.0, host_bytes: float = 0.0) -> Cost:
    """Forward + backward of `micro_batches` micro-batches of `rows` rows, one optimizer update.
    `optimizer_bytes`: this chip's bytes read and written by the update (params, grads, moments);
    `ici_bytes` / `host_bytes`: what one chip moves over ICI / PCIe per micro-batch."""
    forward = micro_batches * forward_flops(config, rows, length, images, patches, rows * response_len)
    passes = 4 if config.remat else 3
    bytes_ = micro_batches * passes * weight_bytes + optimizer_bytes
    time, bound = _bound(passes * forward, bytes_, micro_batches * ici_bytes, micro_batches * host_bytes, chip,
                         chips)
    return Cost(3 * forward, passes * forward, bytes_, time, micro_batches * ici_bytes, micro_batches * host_bytes,
                bound)
