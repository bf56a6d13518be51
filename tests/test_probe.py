"""The self-knowledge probe (vlcal_jax.eval.probe, python -m vlcal_jax.probe) on a tiny random
Qwen3-VL: the logistic fit against sklearn, the token positions against the tokenizer, the
states against the model's own logits, and the CLI end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from test_evaluate import fake_generation, model_dir, world  # noqa: F401 (fixtures)
from vlcal_jax import models, sampling
from vlcal_jax import probe as probe_cli
from vlcal_jax.data import scenes
from vlcal_jax.eval import probe
from vlcal_jax.evaluate import load_examples
from vlcal_jax.rl import rollout
from vlcal_jax.training import checkpoints


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_fit_logistic_is_sklearns_logistic_regression(c):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6))
    y = (x @ np.array([1.5, -1.0, 0.5, 0.0, 0.0, 2.0]) + 0.3 + rng.standard_normal(300) > 0).astype(int)
    weights, bias = probe.fit_logistic(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.float32(c))
    reference = LogisticRegression(C=c, tol=1e-12, max_iter=100000).fit(x, y)
    np.testing.assert_allclose(np.asarray(weights), reference.coef_[0], rtol=2e-3, atol=2e-4)
    assert float(bias) == pytest.approx(float(reference.intercept_[0]), rel=2e-3, abs=2e-4)


def test_probe_finds_a_planted_signal_and_not_noise():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((800, 8))
    signal = (x[:, 2] + 0.5 * rng.standard_normal(800) > 0).astype(int)
    noise = rng.integers(0, 2, 800)
    found = probe.probe_auroc(x[:600], signal[:600], x[600:], signal[600:])
    assert found["auroc"] > 0.85 and found["interval"][0] > 0.8 and found["c"] in probe.C_GRID
    blind = probe.probe_auroc(x[:600], noise[:600], x[600:], noise[600:])
    assert blind["interval"][0] < 0.5 < blind["interval"][1]
    with pytest.raises(ValueError, match="every training label is 1"):
        probe.probe_auroc(x[:10], np.ones(10, int), x[10:20], signal[10:20])


def test_token_positions_point_at_the_stated_digits(world):  # noqa: F811
    samples, tokenizer, *_ = world
    text = scenes.teacher_response(samples[0])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    vision, reasoning, analysis = probe.token_positions(text, encoded["offset_mapping"], len(ids))
    stated = lambda tag: text.split(f"<{tag}>")[1].split("<")[0]  # noqa: E731
    assert tokenizer.decode(ids[vision:vision + 1]).strip() == stated("vision_confidence")[0]
    assert tokenizer.decode(ids[reasoning:reasoning + 1]).strip() == stated("reasoning_confidence")[0]
    # a tag merged with the next word ("...analysis" then ">The"): the token holding the word's start
    assert tokenizer.decode(ids[analysis:analysis + 1]).strip().lstrip(">") == stated("analysis").split()[0]
    assert probe.token_positions(text, encoded["offset_mapping"], reasoning) is None  # cut before the digit
    without = text.split("<confidence>")[0]
    assert probe.token_positions(without, tokenizer(without, return_offsets_mapping=True,
                                                    add_special_tokens=False)["offset_mapping"], 4096) is None


def test_states_are_the_ones_that_predict_the_digits(world):  # noqa: F811
    """Each state, through the LM head, gives the logits the full forward has at the token before
    the digit; batches of 2 (with a padded last batch) equal one example at a time."""
    samples, tokenizer, config, params, image_config = world
    examples = [s.to_example() for s in samples[:3]]
    responses = [scenes.teacher_response(s) for s in samples[:3]]
    responses[1] = responses[1].split("<confidence>")[0]  # no confidences: left out
    states, kept = probe.confidence_states(config, params, tokenizer, image_config, examples, responses,
                                           prompt="decoupled", max_tokens=256, batch_size=2)
    np.testing.assert_array_equal(kept, [True, False, True])
    width = config.text.hidden_size
    assert states.shape == (2, len(probe.POSITIONS) * width)
    for state, i in zip(states, (0, 2)):
        alone, _ = probe.confidence_states(config, params, tokenizer, image_config, examples[i:i + 1],
                                           responses[i:i + 1], prompt="decoupled", max_tokens=256, batch_size=1)
        np.testing.assert_allclose(alone[0], state, rtol=1e-5, atol=1e-5)
        prompt = rollout.encode_examples(examples[i:i + 1], tokenizer, config, image_config, mode="decoupled")
        ids = tokenizer(responses[i], add_special_tokens=False, return_offsets_mapping=True)
        positions = probe.token_positions(responses[i], ids["offset_mapping"], 256)
        full = np.concatenate([np.asarray(prompt.inputs.input_ids[0]), ids["input_ids"]])[None]
        mask = np.concatenate([np.asarray(prompt.inputs.attention_mask[0]), np.ones(len(ids["input_ids"]), int)])
        vision = prompt.inputs.vision
        pixels = np.asarray(vision.pixel_values[0])[np.asarray(vision.patch_mask[0])]
        side = int(round(np.sqrt(len(pixels))))
        inputs = models.prepare_inputs(config, full, mask[None], pixels, np.array([[1, side, side]]))
        logits = np.asarray(models.apply(config, params, inputs))[0]
        start = prompt.inputs.input_ids.shape[1]
        for k, position in enumerate(positions):
            from_state = np.asarray(models.logits_from_hidden(config, params, jnp.asarray(
                state[k * width:(k + 1) * width])[None, None]))[0, 0]
            np.testing.assert_allclose(from_state, logits[start + position - 1], rtol=1e-4, atol=1e-4)


def test_probe_cli_end_to_end(world, model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    _, tokenizer, *_ = world
    data = tmp_path / "scenes"
    scenes.write_dataset(data, 24, seed=5, test_fraction=0.5)
    examples = load_examples("scenes", str(data), split="train") + load_examples("scenes", str(data), split="test")
    by_id = {s.id: s for s in scenes.generate_samples(24, seed=5)}
    errors = [(False, False), (True, False), (False, True), (True, True)] * 6
    responses = [scenes.teacher_response(by_id[e.id], vision_error=v, reasoning_error=r)
                 for e, (v, r) in zip(examples, errors)]
    fake, _ = fake_generation(tokenizer, responses)
    monkeypatch.setattr(sampling, "sample", fake)
    report = probe_cli.main(["--model_path", str(model_dir), "--data_dir", str(data), "--out", str(tmp_path / "out"),
                             "--batch_size", "4", "--max_new_tokens", "512"])
    written = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert written == json.loads(json.dumps(report))
    answer = report["answer_right"]
    assert answer["probe_vision_confidence_state"]["n_train"] == 12 == answer["stated_confidence"]["n_test"]
    test_responses = responses[12:]
    right = [f"\\boxed{{{by_id[e.id].answer}}}" in t for e, t in zip(examples[12:], test_responses)]
    stated = [float(t.split("<vision_confidence>")[1].split("<")[0]) for t in test_responses]
    seen = [not v for v, _ in errors[12:]]
    assert report["vision_span_right"]["stated_vision_confidence"]["auroc"] == pytest.approx(
        roc_auc_score(seen, stated))
    assert report["accuracy"] == pytest.approx(np.mean(right))
    assert "probe on the state at the vision-confidence digit" in capsys.readouterr().out

    # --warm_start: the weights of a run's warm_start/ (here the model's, scaled), not the directory's
    _, _, config, params, _ = world
    scaled = jax.tree.map(lambda leaf: leaf * 1.5, params)
    store = checkpoints.ParamsStore(str(tmp_path / "warm_start"))
    store.save(scaled)
    store.close()
    fake, _ = fake_generation(tokenizer, responses)
    monkeypatch.setattr(sampling, "sample", fake)
    before = probe_cli.main(["--model_path", str(model_dir), "--data_dir", str(data), "--out", str(tmp_path / "ws"),
                             "--batch_size", "4", "--max_new_tokens", "512", "--warm_start", str(tmp_path / "warm_start")])
    assert before["settings"]["warm_start"] == str(tmp_path / "warm_start")
    assert before["vision_span_right"]["stated_vision_confidence"] == report["vision_span_right"]["stated_vision_confidence"]
    assert before["answer_right"]["probe_all_states"] != report["answer_right"]["probe_all_states"]
    with pytest.raises(FileNotFoundError, match="--warm_start .*missing: no such directory"):
        probe_cli.main(["--model_path", str(model_dir), "--data_dir", str(data), "--warm_start",
                        str(tmp_path / "missing")])

    fake, _ = fake_generation(tokenizer, ["no format at all"] * 24)
    monkeypatch.setattr(sampling, "sample", fake)
    with pytest.raises(ValueError, match="only 0 of 12 answers state both confidences"):
        probe_cli.main(["--model_path", str(model_dir), "--data_dir", str(data), "--out", str(tmp_path / "out"),
                        "--batch_size", "4", "--max_new_tokens", "512"])


def test_readout_splits_level_from_scene_and_the_changes_add_up():
    from vlcal_jax import readout

    same = np.tile(np.arange(10.0), (5, 1))  # every scene the same logits: level 9, scene 0
    assert readout.level_and_scene(same) == {"level": 9.0, "scene": 0.0}
    shifted = same + np.arange(5.0)[:, None]  # a shift shared by the ten digits changes nothing
    assert readout.level_and_scene(shifted) == {"level": 9.0, "scene": 0.0}
    varied = same.copy()
    varied[:, 0] += [0, 0, 0, 0, 5.0]
    got = readout.level_and_scene(varied)
    centred = varied - varied.mean(1, keepdims=True)
    assert got["scene"] == pytest.approx(centred.std(0).mean()) and got["scene"] > 0
    rng = np.random.default_rng(0)
    h0, h1, w0, w1 = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    np.testing.assert_allclose(h0 @ (w1 - w0).T + (h1 - h0) @ w1.T, h1 @ w1.T - h0 @ w0.T, atol=1e-12)
    parts = readout.decompose(h0, h0, w0, w0)
    assert parts["change_from_the_rows"] == parts["change_from_the_states"] == {"level": 0.0, "scene": 0.0}


def test_readout_cli_end_to_end(world, model_dir, tmp_path, monkeypatch):  # noqa: F811
    from vlcal_jax import readout

    samples, tokenizer, config, params, _ = world
    data = tmp_path / "scenes"
    scenes.write_dataset(data, 12, seed=5, test_fraction=0.5)
    by_id = {s.id: s for s in scenes.generate_samples(12, seed=5)}
    examples = load_examples("scenes", str(data), split="test")
    responses = [scenes.teacher_response(by_id[e.id]) for e in examples]
    reports = {}
    for name, weights in {"same": params, "scaled": jax.tree.map(lambda leaf: leaf * 1.5, params)}.items():
        store = checkpoints.ParamsStore(str(tmp_path / name))
        store.save(weights)
        store.close()
        fake, _ = fake_generation(tokenizer, responses)
        monkeypatch.setattr(sampling, "sample", fake)
        reports[name] = readout.main(["--model_path", str(model_dir), "--warm_start", str(tmp_path / name),
                                      "--data_dir", str(data), "--batch_size", "4", "--max_new_tokens", "512"])
    same, scaled = reports["same"], reports["scaled"]
    assert same["answers"] == len(examples) == scaled["answers"]
    assert same["logits_before"] == pytest.approx(same["logits_after"])  # the warm start is the model itself
    assert same["change_from_the_rows"] == same["change_from_the_states"] == {"level": 0.0, "scene": 0.0}
    assert scaled["change_from_the_rows"]["level"] > 0 and scaled["logits_after"] == pytest.approx(same["logits_after"])
    with pytest.raises(FileNotFoundError, match="--warm_start"):
        readout.main(["--model_path", str(model_dir), "--warm_start", str(tmp_path / "missing"), "--data_dir", str(data)])
