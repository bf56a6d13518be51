"""Model-directory export, the evaluation loop and its CLI, on a tiny random Qwen3-VL."""

import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from vlcal_jax import models, processing, sampling
from vlcal_jax import evaluate as evaluate_cli
from vlcal_jax.data import scenes
from vlcal_jax.eval import evaluate as ev
from vlcal_jax.rl import rollout
from vlcal_jax.training import export

# Sampling settings of every real-generation test (here and in test_predict.py), so they all
# reuse one compiled program; batching and last-batch padding are checked with fake_generation.
BATCH, NEW_TOKENS, TEMPERATURE, TOP_P = 1, 8, 0.6, 0.95


def random_params(config, seed=0, std=0.02):
    """models.init_params' scheme (normal weights, unit norm scales, zero biases) drawn with NumPy:
    eager jax.random compiles one program per leaf shape, about 25 s for this tiny model on CPU."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(0))

    def leaf(path, shape):
        name = path[-1].key
        if name == "bias":
            return jnp.zeros(shape.shape, shape.dtype)
        if name in ("scale", "q_norm", "k_norm", "input_norm", "post_norm", "norm"):
            return jnp.ones(shape.shape, shape.dtype)
        return jnp.asarray(std * rng.standard_normal(shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def tiny_world(tmp_dir, n_samples=12):
    samples = scenes.generate_samples(n_samples, seed=3)
    texts = [s.question for s in samples] + [scenes.teacher_response(s) for s in samples]
    tokenizer = processing.train_demo_tokenizer(texts * 4, 400, os.path.join(tmp_dir, "tok"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = models.ModelConfig(
        vision=models.VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                   out_hidden_size=48, num_position_embeddings=64, deepstack_visual_indexes=(0,)),
        text=models.TextConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                               rope_theta=10000.0, mrope_section=(2, 2, 2)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    params = random_params(config)
    image_config = processing.ImageProcessorConfig.qwen3_vl(patch_size=8, min_pixels=64 * 64, max_pixels=64 * 64)
    return samples, tokenizer, config, params, image_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    _, tokenizer, config, params, image_config = world
    return export.export_model_dir(config, params, tokenizer, image_config, tmp_path_factory.mktemp("model"))


def fake_generation(tokenizer, responses):
    """A stand-in for sampling.sample that 'samples' the given texts in order:
    each call takes the next rows (as many as the batch has real examples left) and fills
    padding rows with a garbage response, as a real sampler would."""
    queue = list(responses)
    calls = []

    def fake(config, params, inputs, rng, temperature, top_p, *, max_new_tokens, n, greedy, top_k,
             eos_token_ids, pad_token_id, use_top_p=True, engine_name="continuous", slots=0):
        rows = inputs.input_ids.shape[0] * n
        calls.append(np.asarray(inputs.input_ids))
        tokens = np.full((rows, max_new_tokens), pad_token_id, np.int32)
        lengths, finished = np.zeros(rows, np.int32), np.zeros(rows, bool)
        for row in range(rows):
            text = queue.pop(0) if queue else "padding row: no format \\boxed{nonsense}"
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_token_ids[0]]
            ids = ids[:max_new_tokens]
            tokens[row, :len(ids)] = ids
            lengths[row], finished[row] = len(ids), ids[-1] in eos_token_ids
        zeros = np.zeros(tokens.shape, np.float32)
        return sampling.SampleOutput(tokens, zeros, zeros, lengths, finished)

    return fake, calls


def stated(response, tag):
    found = re.search(rf"<{tag}>(\d+)</{tag}>", response)
    return None if found is None else int(found.group(1)) / 10


def paper_ece(confidence, correct):
    """Re-derivation of the paper's 10-bin ECE: bins [k/10, (k+1)/10) in float64, the last closed."""
    edges = np.linspace(0, 1, 11)
    total = 0.0
    for b in range(10):
        upper_ok = (confidence < edges[b + 1]) if b < 9 else (confidence <= 1.0)
        members = (confidence >= edges[b]) & upper_ok
        if members.any():
            total += members.sum() / len(confidence) * abs(confidence[members].mean() - correct[members].mean())
    return total


# ---- export / load ---------------------------------------------------------------------------------------------

def test_export_load_round_trip(world, model_dir, tmp_path):
    samples, tokenizer, config, params, image_config = world
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= set(os.listdir(model_dir))
    config2, params2, tokenizer2, image_config2 = export.load_model_dir(model_dir)
    assert config2 == config and image_config2 == image_config
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    texts = [scenes.teacher_response(s) for s in samples[:4]] + ["<|im_start|>user\n<|image_pad|>hi<|im_end|>"]
    assert tokenizer2(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert (tokenizer2.eos_token_id, tokenizer2.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer2.chat_template == tokenizer.chat_template

    images = [s.image for s in samples[:3]] + [samples[3].image.resize((90, 40))]
    ours = processing.preprocess_images(images, image_config)
    again = processing.preprocess_images(images, image_config2)
    np.testing.assert_array_equal(again[0], ours[0])
    np.testing.assert_array_equal(again[1], ours[1])
    hf = hf_qwen2_vl.Qwen2VLImageProcessorPil.from_pretrained(model_dir)(images=images)
    np.testing.assert_array_equal(hf["image_grid_thw"], ours[1])
    np.testing.assert_allclose(hf["pixel_values"], ours[0], rtol=0, atol=1e-5)

    batch = rollout.encode_examples([s.to_example() for s in samples[:2]], tokenizer2, config2, image_config2)
    logits = models.apply_jit(config, params, batch.inputs)
    logits2 = models.apply_jit(config2, params2, batch.inputs)
    np.testing.assert_array_equal(np.asarray(logits2), np.asarray(logits))

    # bfloat16 weights in shards with an index load back to the same values
    sharded = export.export_model_dir(config, params, tokenizer, image_config, tmp_path / "bf16", dtype="bfloat16",
                                      max_shard_bytes=20_000)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    _, params_bf16, _, _ = export.load_model_dir(sharded, dtype="bfloat16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype("bfloat16"))),
                 params_bf16, params)


def test_load_model_dir_names_missing_files(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such model directory.*Qwen3-VL-4B-Instruct"):
        export.load_model_dir(str(tmp_path / "nowhere"))
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    os.remove(broken / "tokenizer.json")
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError) as error:
        export.load_model_dir(broken)
    message = str(error.value)
    assert "model.safetensors" in message and "tokenizer.json" in message and "huggingface-cli download" in message
    assert "config.json" not in message.split("missing")[1].split(".")[0]


def test_export_rejects_mismatched_image_settings(world, tmp_path):
    _, tokenizer, config, params, image_config = world
    wrong = processing.ImageProcessorConfig.qwen3_vl(patch_size=16)
    with pytest.raises(ValueError, match="patch_size=16 but config.json vision patch_size=8"):
        export.export_model_dir(config, params, tokenizer, wrong, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="prompt='decoupledd'"):
        export.export_model_dir(config, params, tokenizer, image_config, tmp_path / "out", prompt="decoupledd")


# ---- metric plumbing with known responses ----------------------------------------------------------------------

def test_teacher_responses_score_perfectly(world, monkeypatch):
    samples, tokenizer, config, params, image_config = world
    chosen = samples[:5]
    responses = [scenes.teacher_response(s) for s in chosen]
    fake, calls = fake_generation(tokenizer, responses)
    monkeypatch.setattr(sampling, "sample", fake)
    result = ev.evaluate(config, params, tokenizer, image_config, [s.to_example() for s in chosen],
                         batch_size=4, max_new_tokens=512)
    assert len(calls) == 2 and all(ids.shape[0] == 4 for ids in calls)  # last batch padded to the batch size
    overall = result.metrics["overall"]
    assert overall["accuracy"] == 1.0 and overall["format_rate"] == 1.0 and overall["missing_confidence"] == 0
    assert overall["perception_accuracy"] == 1.0
    assert [r["id"] for r in result.records] == [s.id for s in chosen]
    for record, sample, response in zip(result.records, chosen, responses):
        assert record["perception_correct"] is True and record["correct"] is True
        assert record["answer"] == sample.answer and record["response"] == response
        v, r = stated(response, "vision_confidence"), stated(response, "reasoning_confidence")
        assert (record["vision_confidence"], record["reasoning_confidence"]) == (v, r)
        assert record["confidence"] == pytest.approx(2 * v * r / (v + r))
        assert record["truncated"] is False


def test_metrics_match_independent_recomputation(world, monkeypatch, tmp_path):
    samples, tokenizer, config, params, image_config = world
    errors = [(False, False), (True, False), (False, True), (True, True)] * 3
    responses = [scenes.teacher_response(s, vision_error=v, reasoning_error=r) for s, (v, r) in zip(samples, errors)]
    responses[5] = responses[5].split("<confidence>")[0]  # no confidence block: counted missing, scored as 0
    fake, _ = fake_generation(tokenizer, responses)
    monkeypatch.setattr(sampling, "sample", fake)
    result = ev.evaluate(config, params, tokenizer, image_config, [s.to_example() for s in samples],
                         batch_size=5, max_new_tokens=512, out_dir=tmp_path)
    records = result.records
    gold_in_box = np.array([f"\\boxed{{{s.answer}}}" in t for s, t in zip(samples, responses)])
    np.testing.assert_array_equal([r["correct"] for r in records], gold_in_box)
    for record, (vision_error, _) in zip(records, errors):
        assert record["perception_correct"] is (not vision_error)
    assert records[5]["confidence"] is None and records[5]["vision_confidence"] is None

    def check(block, confidence, correct):
        confidence = np.array([0.0 if c is None else c for c in confidence])
        correct = np.asarray(correct, float)
        assert block["n"] == len(correct)
        assert block["auroc"] == pytest.approx(roc_auc_score(correct, confidence), abs=1e-12)
        assert block["brier"] == pytest.approx(brier_score_loss(correct, confidence), abs=1e-12)
        assert block["ece"] == pytest.approx(paper_ece(confidence, correct), abs=1e-12)
        assert block["mean_confidence"] == pytest.approx(confidence.mean())

    overall = result.metrics["overall"]
    assert overall["accuracy"] == pytest.approx(gold_in_box.mean())
    assert overall["missing_confidence"] == 1 and overall["confidence"]["missing"] == 1
    assert overall["format_rate"] == pytest.approx(11 / 12)
    check(overall["confidence"], [r["confidence"] for r in records], gold_in_box)
    check(overall["reasoning"], [r["reasoning_confidence"] for r in records], gold_in_box)
    check(overall["vision"], [r["vision_confidence"] for r in records], [not v for v, _ in errors])
    # accuracy per fifth of the scenes by the world's difficulty score (ties by id), easiest first
    assert [r["difficulty"] for r in records] == [s.difficulty for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (samples[i].difficulty, samples[i].id))
    sizes = [len(samples) // 5 + (k < len(samples) % 5) for k in range(5)]
    bounds = np.cumsum([0] + sizes)
    fifths = [gold_in_box[order[a:b]].mean() for a, b in zip(bounds[:-1], bounds[1:])]
    assert overall["by_difficulty"]["accuracy"] == pytest.approx(fifths)
    assert overall["by_difficulty"]["gap"] == pytest.approx(fifths[0] - fifths[-1])
    assert ev.accuracy_by_difficulty([dict(r, difficulty=None) for r in records]) is None
    assert [r["question_type"] for r in records] == [s.question_type for s in samples]
    typed = overall["by_question_type"]
    assert typed["accuracy"] == {t: pytest.approx(gold_in_box[[s.question_type == t for s in samples]].mean())
                                 for t in {s.question_type for s in samples}}
    for category, group in result.metrics["categories"].items():
        members = [i for i, s in enumerate(samples) if f"scenes/{s.kind}" == category]
        assert group["n"] == len(members)
        assert group["accuracy"] == pytest.approx(gold_in_box[members].mean())
        assert group["confidence"]["brier"] == pytest.approx(brier_score_loss(
            gold_in_box[members], [records[i]["confidence"] or 0.0 for i in members]))

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["metrics"]["overall"]["confidence"]["auroc"] == overall["confidence"]["auroc"]
    assert written["settings"]["temperature"] == 0.6 and written["settings"]["missing_confidence_as"] == 0.0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [s.id for s in samples]
    for name in ("reliability_confidence.png", "reliability_vision.png", "reliability_reasoning.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.md").read_text()
    assert "**overall**" in table and "scenes/perception" in table and f"{overall['accuracy']:.3f}" in table


def test_baseline_modes_and_undefined_auroc(world):
    samples = world[0][:3]
    examples = [s.to_example() for s in samples]
    rlcr = [f"<think>x</think> \\boxed{{{s.answer}}} <analysis>a</analysis><confidence>7</confidence>"
            for s in samples]
    summary = ev.summarize(ev.score_responses(examples, rlcr, mode="rlcr"), mode="rlcr")["overall"]
    assert summary["accuracy"] == 1.0 and summary["confidence"]["mean_confidence"] == pytest.approx(0.7)
    assert summary["confidence"]["auroc"] is None  # every answer right: undefined, not an error
    assert summary["vision"] is None and summary["reasoning"] is None
    assert summary["perception_accuracy"] is None  # no <vision> span in the format: not scored (not 0)
    plain = ev.summarize(ev.score_responses(examples, ["<think>x</think> \\boxed{no}"] * 3, mode="plain"), "plain")
    assert plain["overall"]["confidence"] is None and plain["overall"]["missing_confidence"] is None
    with pytest.raises(ValueError, match="3 examples but 2 responses"):
        ev.score_responses(examples, rlcr[:2], mode="rlcr")


# ---- real generation --------------------------------------------------------------------------------------------

def test_evaluate_tiny_model_end_to_end(world):
    samples, tokenizer, config, params, image_config = world
    examples = [s.to_example() for s in samples[:5]]
    result = ev.evaluate(config, params, tokenizer, image_config, examples, batch_size=BATCH,
                         max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, seed=1)
    assert len(result.records) == 5
    assert set(result.records[0]) == {
        "id", "category", "question", "gold", "answer", "correct", "vision_confidence", "reasoning_confidence",
        "confidence", "format_ok", "perception_correct", "perception_missing", "perception_wrong", "response",
        "num_tokens", "truncated", "difficulty", "question_type"}
    for record in result.records:
        assert 1 <= record["num_tokens"] <= NEW_TOKENS and isinstance(record["perception_correct"], bool)
        assert record["num_tokens"] == NEW_TOKENS or not record["truncated"]
    overall = result.metrics["overall"]
    assert set(overall) == {"n", "accuracy", "format_rate", "missing_confidence", "truncated", "mean_tokens",
                            "perception_accuracy", "by_difficulty", "by_question_type", "confidence", "vision",
                            "reasoning",
                            "reasoning_given_perception"}
    assert set(overall["confidence"]) == {"n", "missing", "mean_confidence", "ece", "auroc", "brier", "aurc",
                                          "ece_low", "ece_high", "auroc_low", "auroc_high", "bins_over_10pct"}
    block = overall["confidence"]
    assert block["ece_low"] <= block["ece"] <= block["ece_high"]
    assert overall["n"] == 5 and set(result.metrics["categories"]) <= {"scenes/perception", "scenes/reasoning"}
    assert result.settings["generated_tokens"] == sum(r["num_tokens"] for r in result.records)
    again = ev.evaluate(config, params, tokenizer, image_config, examples, batch_size=BATCH,
                        max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, seed=1)
    assert again.settings["compiled_programs"] == 0  # same shapes: no recompilation
    assert [r["response"] for r in again.records] == [r["response"] for r in result.records]


def test_evaluate_cli_on_exported_model(model_dir, tmp_path, capsys):
    scenes.write_dataset(tmp_path / "scenes", 20, seed=5, test_fraction=0.25)
    out = tmp_path / "out"
    result = evaluate_cli.main(["--model_path", str(model_dir), "--benchmark", "scenes", "--data_dir",
                                str(tmp_path / "scenes"), "--limit", "5", "--out", str(out), "--batch_size",
                                str(BATCH), "--max_new_tokens", str(NEW_TOKENS),
                                "--temperature", str(TEMPERATURE), "--top_p", str(TOP_P)])
    printed = capsys.readouterr().out
    assert "| **overall** | 5 |" in printed and "records.jsonl" in printed
    assert {"records.jsonl", "metrics.json", "table.md", "reliability_confidence.png",
            "reliability_vision.png", "reliability_reasoning.png"} <= set(os.listdir(out))
    written = json.loads((out / "metrics.json").read_text())
    assert written["settings"]["benchmark"] == "scenes" and written["metrics"]["overall"]["n"] == 5
    assert all(r["perception_correct"] is not None for r in result.records)
    assert all(r["id"].startswith("scene-5-") for r in result.records)


def test_evaluate_cli_errors(model_dir, tmp_path):
    args = ["--model_path", str(model_dir), "--data_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="unknown benchmark 'mathvistaa'.*mathvista"):
        evaluate_cli.main(args + ["--benchmark", "mathvistaa"])
    with pytest.raises(FileNotFoundError, match=r"test.parquet: no such file.*python -m vlcal_jax.data.scenes"):
        evaluate_cli.main(args + ["--benchmark", "scenes"])
    with pytest.raises(FileNotFoundError, match="MathVista"):
        evaluate_cli.main(args + ["--benchmark", "mathvista"])
    with pytest.raises(FileNotFoundError, match="missing: no such model directory"):
        evaluate_cli.main(["--model_path", str(tmp_path / "missing"), "--benchmark", "scenes",
                           "--data_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="top_p=1.5"):
        ev.evaluate(None, None, None, None, [object()], top_p=1.5)


def test_question_type_ceiling_is_the_cross_fitted_auroc_of_type_accuracy():
    # ids in order, the two folds alternate by id; three types of different accuracy
    rng = np.random.default_rng(0)
    types = rng.choice(["a", "b", "c"], size=60)
    rate = {"a": 0.9, "b": 0.3, "c": 0.6}
    correct = np.array([rng.random() < rate[t] for t in types])
    records = [{"id": f"x-{i:03d}", "question_type": t, "correct": bool(c)} for i, (t, c) in enumerate(zip(types, correct))]
    shuffled = [records[i] for i in rng.permutation(len(records))]  # the order given does not matter
    result = ev.accuracy_by_question_type(shuffled)
    # independent re-derivation: each half scored by the other half's per-type accuracy
    score = np.zeros(len(records))
    for i in range(len(records)):
        other = [j for j in range(len(records)) if j % 2 != i % 2 and types[j] == types[i]]
        score[i] = correct[other].mean()
    assert result["auroc_ceiling"] == pytest.approx(roc_auc_score(correct, score), abs=1e-12)
    assert result["auroc_ceiling"] > 0.6  # the types do separate right from wrong here
    assert result["accuracy"] == {t: pytest.approx(correct[types == t].mean()) for t in "abc"}
    assert ev.accuracy_by_question_type([dict(r, question_type=None) for r in records]) is None
    assert ev.accuracy_by_question_type([dict(r, correct=True) for r in records]) is None
