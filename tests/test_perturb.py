"""Patch-space image perturbations (PAPER.md section 4) against the HF processor layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from vlcal_jax.rl import perturb

# Tiny layout: C = 3 channels, Tp = 2 temporal copies, P = 2 pixel patches, merge 2x2.
C, TP, P, M = 3, 2, 2, 2
GRID = ((1, 4, 6), (1, 2, 2))  # two images: 8x12 and 4x4 pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _images(seed):
    """Per image [Tp, C, H, W] normalised pixels (both temporal copies equal, as the processor makes)."""
    rng = np.random.default_rng(seed)
    images = []
    for t, gh, gw in GRID:
        frame = (rng.integers(0, 256, (C, gh * P, gw * P)) / 255.0 - 0.5) / 0.5
        images.append(np.repeat(frame[None], TP * t, axis=0).astype(np.float32))
    return images


def _pixel_values(seed):
    return np.concatenate([ref.patchify(im, M, P, TP) for im in _images(seed)])


LAYOUT = dict(merge_size=M, patch_size=P, temporal_patch_size=TP)


def test_patch_layout_round_trip_against_numpy_reference():
    images = _images(0)
    pixel_values = _pixel_values(0)
    rebuilt = perturb.patches_to_images(jnp.asarray(pixel_values), GRID, **LAYOUT)
    for got, expected in zip(rebuilt, images):
        np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(np.asarray(perturb.images_to_patches(rebuilt, GRID, **LAYOUT)), pixel_values)
    same = jax.jit(lambda pv: perturb.blur(pv, GRID, radius=0.0, **LAYOUT))(pixel_values)
    np.testing.assert_array_equal(np.asarray(same), pixel_values)
    with pytest.raises(ValueError, match="covers"):
        perturb.patches_to_images(jnp.asarray(pixel_values[:-4]), GRID, **LAYOUT)


def test_blur_matches_numpy_gaussian():
    images, pixel_values = _images(1), _pixel_values(1)
    got = np.asarray(jax.jit(lambda pv: perturb.blur(pv, GRID, radius=1.5, **LAYOUT))(pixel_values))
    expected = np.concatenate([ref.patchify(ref.gaussian_blur_2d(im, 1.5), M, P, TP) for im in images])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A blur keeps the mean of a constant image and flattens a random one.
    assert got.std() < pixel_values.std()


def test_blackout_rows_and_rate():
    pixel_values = np.random.default_rng(0).normal(size=(4000, C * TP * P * P)).astype(np.float32)
    out = np.asarray(jax.jit(perturb.patch_blackout)(pixel_values, jax.random.key(0), 0.8))
    black = np.all(out == -1.0, axis=1)  # pixel 0 with mean = std = 0.5 is exactly -1.0
    kept = np.all(out == pixel_values, axis=1)
    assert np.all(black | kept)
    assert abs(black.mean() - 0.8) < 0.03  # binomial std 0.0063
    clip = np.asarray(perturb.patch_blackout(pixel_values[:50], jax.random.key(1), 1.0, CLIP_MEAN, CLIP_STD))
    expected_row = np.repeat([(0.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)], TP * P * P)
    np.testing.assert_allclose(clip, np.broadcast_to(expected_row, clip.shape), rtol=1e-6)


def test_perturbations_are_deterministic_and_k_vmap_equals_loop():
    pixel_values = _pixel_values(2)
    rng = jax.random.key(7)
    for kind, kw in (("blackout", {"prob": 0.5}), ("noise", {"std_pixels": 60.0, "temporal_patch_size": TP})):
        stacked = np.asarray(perturb.perturb_k(pixel_values, rng, 3, kind, **kw))
        again = np.asarray(perturb.perturb_k(pixel_values, rng, 3, kind, **kw))
        np.testing.assert_array_equal(stacked, again)
        fn = jax.jit(functools.partial(perturb.PERTURBATIONS[kind], **kw))
        for i, key in enumerate(jax.random.split(rng, 3)):
            np.testing.assert_array_equal(stacked[i], np.asarray(fn(pixel_values, key)))
        assert not np.array_equal(stacked[0], stacked[1])
    blurred = perturb.perturb_k(pixel_values, rng, 2, "blur", grid_thw=GRID, radius=1.0, **LAYOUT)
    assert blurred.shape == (2,) + pixel_values.shape
    np.testing.assert_array_equal(np.asarray(blurred[0]), np.asarray(blurred[1]))
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb.perturb_k(pixel_values, rng, 2, "jpeg")


def test_gaussian_noise_scale_clip_and_shared_temporal_copies():
    mid = np.zeros((3000, C * TP * P * P), np.float32)  # pixel 127.5: no clipping at std 20
    out = np.asarray(perturb.perturb_k(mid, jax.random.key(0), 1, "noise", std_pixels=20.0, temporal_patch_size=TP)[0])
    np.testing.assert_allclose(out.std(), 20.0 / 255.0 / 0.5, rtol=0.02)
    per_copy = out.reshape(-1, C, TP, P * P)
    np.testing.assert_array_equal(per_copy[:, :, 0], per_copy[:, :, 1])
    wild = np.asarray(perturb.perturb_k(_pixel_values(3), jax.random.key(1), 1, "noise", temporal_patch_size=TP)[0])
    assert wild.min() == -1.0 and wild.max() == 1.0  # std 189: clipped to the [0, 255] range


def test_grey_mask():
    out = np.asarray(perturb.grey_mask(_pixel_values(4)))
    np.testing.assert_allclose(out, (128.0 / 255.0 - 0.5) / 0.5, rtol=1e-6)
