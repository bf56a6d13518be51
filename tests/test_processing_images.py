"""Image preprocessing against transformers' Qwen2VLImageProcessorPil (the HF reference)."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from vlcal_jax import processing

SMALL = processing.ImageProcessorConfig.qwen3_vl(min_pixels=64 * 64, max_pixels=256 * 256)
QWEN3 = processing.ImageProcessorConfig.qwen3_vl()
QWEN2 = processing.ImageProcessorConfig(  # Qwen2-VL style: 14-pixel patches, CLIP statistics
    patch_size=14, min_pixels=56 * 56, max_pixels=160 * 160,
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
_HF_CACHE = {}


def hf_processor(cfg):
    if cfg not in _HF_CACHE:
        _HF_CACHE[cfg] = hf_qwen2_vl.Qwen2VLImageProcessorPil(
            size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
            patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
            merge_size=cfg.merge_size, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))
    return _HF_CACHE[cfg]


def noise(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + 7 * height + width)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


def assert_same_as_hf(images, cfg):
    expected = hf_processor(cfg)(images=images)
    pixel_values, grid_thw = processing.preprocess_images(images, cfg)
    assert grid_thw.dtype == np.int64 and pixel_values.dtype == np.float32
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert pixel_values.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    return pixel_values, grid_thw


_rng = np.random.default_rng(1234)
RANDOM_SIZES = [tuple(int(v) for v in _rng.integers(1, 400, 2)) for _ in range(8)]
CASES = (
    [(SMALL, size, "RGB") for size in RANDOM_SIZES]
    + [(SMALL, (1, 1), "RGB"), (SMALL, (3, 5), "RGB"),            # tiny, far below min_pixels
       (SMALL, (2, 300), "RGB"), (SMALL, (450, 3), "RGB"),         # aspect ratio 1:150
       (SMALL, (5, 1000), "RGB"),                                   # aspect ratio exactly 200
       (SMALL, (513, 769), "RGB"), (SMALL, (1200, 900), "RGB"),     # above max_pixels
       (SMALL, (64, 64), "RGB"), (SMALL, (96, 160), "RGB")]        # already on the grid
    + [(SMALL, (70, 90), mode) for mode in ("RGBA", "LA", "P", "L", "CMYK", "I;16", "1", "PA")]
    + [(QWEN3, (200, 250), "RGB"), (QWEN3, (480, 640), "RGB"), (QWEN3, (30, 2000), "RGBA")]
    + [(QWEN2, (123, 77), "RGB"), (QWEN2, (400, 333), "L")]
)


@pytest.mark.parametrize("cfg,size,mode", CASES)
def test_matches_hf(cfg, size, mode):
    height, width = size
    if mode == "I;16":
        rng = np.random.default_rng(height)
        image = PIL.Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        image = noise(height, width, mode)
    assert image.mode == mode
    _, grid_thw = assert_same_as_hf([image], cfg)
    assert grid_thw[0, 0] == 1 and (grid_thw[0, 1:] % cfg.merge_size == 0).all()


def test_matches_hf_on_a_batch_of_mixed_inputs():
    rng = np.random.default_rng(0)
    transparent = noise(40, 50, "P")
    transparent.info["transparency"] = 3  # palette transparency: HF composites it onto white
    images = [noise(33, 71), rng.integers(0, 256, (45, 20, 3), dtype=np.uint8),
              rng.integers(0, 256, (30, 90, 4), dtype=np.uint8), rng.integers(0, 256, (64, 30, 1), dtype=np.uint8),
              transparent, noise(300, 20, "LA")]
    pixel_values, grid_thw = assert_same_as_hf(images, SMALL)
    assert grid_thw.shape == (6, 3) and pixel_values.shape[0] == grid_thw.prod(axis=1).sum()


def test_files_and_bytes_load_as_hf_load_image(tmp_path):
    png = tmp_path / "rgba.png"
    noise(50, 80, "RGBA").save(png)
    jpeg = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90": HF's load_image applies it
    noise(40, 100).save(jpeg, exif=exif)
    paths = [str(png), str(jpeg)]
    pixel_values, grid_thw = assert_same_as_hf(paths, SMALL)
    assert grid_thw[1, 1] > grid_thw[1, 2]  # portrait after the EXIF rotation
    from_bytes = processing.preprocess_images([png.read_bytes(), {"bytes": jpeg.read_bytes(), "path": None}], SMALL)
    np.testing.assert_array_equal(from_bytes[0], pixel_values)
    np.testing.assert_array_equal(processing.preprocess_images([png], SMALL)[1], grid_thw[:1])


def test_smart_resize_matches_hf():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(1, 5000, 2))
        width = max(1, width // int(rng.choice([1, 1, 50, 199])))
        factor = int(rng.choice([28, 32]))
        min_pixels = int(rng.choice([56 * 56, 65536, 128 * 128]))
        max_pixels = int(rng.choice([256 * 256, 1003520, 16777216]))
        try:
            expected = hf_qwen2_vl.smart_resize(height, width, factor, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                processing.smart_resize(height, width, factor, min_pixels, max_pixels)
            continue
        assert processing.smart_resize(height, width, factor, min_pixels, max_pixels) == expected


def test_errors_name_the_image(tmp_path):
    good = noise(20, 20)
    with pytest.raises(ValueError, match=r"images\[1\].*zero size"):
        processing.preprocess_images([good, PIL.Image.new("RGB", (0, 12))], SMALL)
    with pytest.raises(ValueError, match=r"images\[0\].*zero size"):
        processing.preprocess_images([np.zeros((0, 5, 3), np.uint8)], SMALL)
    with pytest.raises(ValueError, match=r"images\[2\].*aspect ratio 201.0.*crop or pad"):
        processing.preprocess_images([good, good, noise(2, 402)], SMALL)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match=r"images\[1\] \(.*notes\.txt\): not a readable image"):
        processing.preprocess_images([good, str(text_file)], SMALL)
    with pytest.raises(ValueError, match=r"images\[0\]: not a readable image"):
        processing.preprocess_images([np.random.default_rng(0).bytes(300)], SMALL)
    with pytest.raises(FileNotFoundError, match=r"images\[0\] \(.*missing\.png\): no such file"):
        processing.preprocess_images([str(tmp_path / "missing.png")], SMALL)
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        processing.preprocess_images([np.zeros((8, 8, 3), np.float32)], SMALL)


def test_config_from_pretrained_matches_hf(tmp_path):
    variants = {
        "qwen3": {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                  "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast"},
        "legacy": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                   "image_processor_type": "Qwen2VLImageProcessor"},
        "sparse": {"image_processor_type": "Qwen2VLImageProcessor"},
    }
    for name, raw in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(raw))
        ours = processing.ImageProcessorConfig.from_pretrained(tmp_path / name)
        hf = hf_qwen2_vl.Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path / name))
        assert (ours.min_pixels, ours.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"]), name
        assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (
            hf.patch_size, hf.temporal_patch_size, hf.merge_size), name
        np.testing.assert_allclose(ours.image_mean, hf.image_mean)
        np.testing.assert_allclose(ours.image_std, hf.image_std)
    assert processing.ImageProcessorConfig.from_pretrained(tmp_path / "qwen3") == QWEN3
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        processing.ImageProcessorConfig.from_pretrained(tmp_path)


def test_model_config_gives_qwen3_defaults():
    model_config = types.SimpleNamespace(
        vision=types.SimpleNamespace(patch_size=14, temporal_patch_size=2, spatial_merge_size=2))
    cfg = processing.resolve_image_config(model_config)
    assert cfg == processing.ImageProcessorConfig.qwen3_vl(patch_size=14)
    images = [noise(50, 60)]
    np.testing.assert_array_equal(processing.preprocess_images(images, model_config)[0],
                                  processing.preprocess_images(images, cfg)[0])
    with pytest.raises(TypeError, match="ImageProcessorConfig"):
        processing.preprocess_images(images, object())


def test_patches_to_images_is_hf_normalised_image_and_round_trips():
    images = [noise(70, 90), noise(300, 40, "L"), noise(20, 20)]
    pixel_values, grid_thw = processing.preprocess_images(images, SMALL)
    decoded = processing.patches_to_images(pixel_values, grid_thw, SMALL)
    hf = hf_processor(SMALL)
    for image, grid, array in zip(images, grid_thw, decoded):
        chw = np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
        size = SizeDict(shortest_edge=SMALL.min_pixels, longest_edge=SMALL.max_pixels)
        resized = hf.resize(chw, size=size, resample=SMALL.resample, factor=SMALL.factor)
        expected = hf.normalize(hf.rescale(resized, SMALL.rescale_factor), SMALL.image_mean, SMALL.image_std)
        assert array.shape == (3, grid[1] * SMALL.patch_size, grid[2] * SMALL.patch_size)
        np.testing.assert_array_equal(array, expected)
    again, grid_again = processing.images_to_patches(decoded, SMALL)
    np.testing.assert_array_equal(again, pixel_values)
    np.testing.assert_array_equal(grid_again, grid_thw)
    assert processing.num_image_tokens(grid_thw, 2).tolist() == [int(g.prod()) // 4 for g in grid_thw]
    assert processing.num_image_tokens(grid_thw[0], 2) == int(grid_thw[0].prod()) // 4


def test_patch_round_trip_in_jax_under_jit():
    pixel_values, grid_thw = processing.preprocess_images([noise(70, 90), noise(40, 130)], SMALL)

    @jax.jit
    def darken(rows):
        images = processing.patches_to_images(rows, grid_thw, SMALL)
        return processing.images_to_patches([image * 0.5 for image in images], SMALL)[0]

    np.testing.assert_allclose(np.asarray(darken(jnp.asarray(pixel_values))), pixel_values * 0.5, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        processing.images_to_patches([np.zeros((3, 33, 64), np.float32)], SMALL)
    with pytest.raises(ValueError, match="grid_thw covers"):
        processing.patches_to_images(pixel_values[:-1], grid_thw, SMALL)


def test_empty_batch_and_qwen3_defaults():
    pixel_values, grid_thw = processing.preprocess_images([], QWEN3)
    assert pixel_values.shape == (0, 3 * 2 * 16 * 16) and grid_thw.shape == (0, 3)
    assert (QWEN3.patch_size, QWEN3.merge_size, QWEN3.temporal_patch_size) == (16, 2, 2)
    assert (QWEN3.min_pixels, QWEN3.max_pixels) == (256 * 256, 4096 * 4096)
    assert QWEN3.image_mean == QWEN3.image_std == (0.5, 0.5, 0.5) and math.isclose(QWEN3.rescale_factor, 1 / 255)
    with pytest.raises(ValueError, match="min_pixels"):
        processing.ImageProcessorConfig(min_pixels=10, max_pixels=5)


def test_model_loaded_from_a_checkpoint_preprocesses_like_its_hf_processor(tmp_path):
    # A checkpoint whose preprocessor_config.json lowers max_pixels (and has CLIP statistics):
    # preprocess_images(images, config) with the loaded model config must equal HF's processor.
    import rl_utils as U
    from vlcal_jax import models

    config = U.tiny_config()
    models.save_pretrained(config, U.random_params(config), str(tmp_path))
    hf_qwen2_vl.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}, patch_size=8, temporal_patch_size=2, merge_size=2,
        image_mean=list(QWEN2.image_mean), image_std=list(QWEN2.image_std)).save_pretrained(str(tmp_path))
    loaded, _ = models.from_pretrained(str(tmp_path))
    assert loaded == config  # the same network: the processor is metadata, not identity
    assert loaded.image_processor == processing.ImageProcessorConfig.from_pretrained(tmp_path)
    assert models.load_config(str(tmp_path)).image_processor == loaded.image_processor
    images = [noise(200, 300), noise(37, 41)]
    expected = hf_qwen2_vl.Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))(images=images)
    pixel_values, grid_thw = processing.preprocess_images(images, loaded)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert grid_thw[0].prod() < processing.preprocess_images(images[:1], config)[1][0].prod()  # bound applied
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    # save_pretrained writes the processor the config carries; loading gives the same config back.
    models.save_pretrained(loaded, U.random_params(config), str(tmp_path / "again"))
    assert models.from_pretrained(str(tmp_path / "again"))[0].image_processor == loaded.image_processor


def test_checkpoint_processor_must_fit_the_vision_tower(tmp_path):
    import rl_utils as U
    from vlcal_jax import models

    config = U.tiny_config()
    models.save_pretrained(config, U.random_params(config), str(tmp_path))
    processing.ImageProcessorConfig.qwen3_vl(patch_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"preprocessor_config.json.*patch_size=16.*patch_size=8"):
        models.load_config(str(tmp_path))
