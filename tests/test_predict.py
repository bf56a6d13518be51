"""`python -m vlcal_jax.predict` on a tiny exported model: printed fields, parsing, input errors."""

import os
import re

import pytest

from test_evaluate import NEW_TOKENS, TEMPERATURE, TOP_P, fake_generation, tiny_world
from vlcal_jax import processing, sampling
from vlcal_jax import predict as predict_cli
from vlcal_jax.data import scenes
from vlcal_jax.training import export

FIELDS = ("answer", "vision confidence", "reasoning confidence", "combined confidence", "format ok", "tokens")


@pytest.fixture(scope="module")
def predict_world(tmp_path_factory):
    samples, tokenizer, config, params, image_config = tiny_world(str(tmp_path_factory.mktemp("world")))
    root = tmp_path_factory.mktemp("predict")
    model_dir = export.export_model_dir(config, params, tokenizer, image_config, root / "model")
    image = root / "scene.png"
    samples[0].image.save(image)
    return samples[0], tokenizer, model_dir, str(image), (config, params, image_config)


def printed_fields(text):
    return dict(re.findall(r"^([a-z ]+): (.*)$", text.split("\nresponse:\n")[0], flags=re.M))


def test_predict_cli_prints_every_field(predict_world, capsys):
    sample, _, model_dir, image, _ = predict_world
    prediction = predict_cli.main(["--model_path", str(model_dir), "--image", image, "--question", sample.question,
                                   "--max_new_tokens", str(NEW_TOKENS), "--temperature", str(TEMPERATURE),
                                   "--top_p", str(TOP_P)])
    out = capsys.readouterr().out
    fields = printed_fields(out)
    assert set(FIELDS) <= set(fields)
    assert 1 <= prediction["num_tokens"] <= NEW_TOKENS
    assert out.rstrip("\n").endswith(prediction["response"].rstrip("\n"))
    if prediction["confidence"] is None:  # a random model rarely writes the format
        assert fields["combined confidence"] == "missing"


def test_predict_parses_a_decoupled_response(predict_world, capsys, monkeypatch):
    sample, tokenizer, model_dir, image, _ = predict_world
    response = scenes.teacher_response(sample)
    fake, calls = fake_generation(tokenizer, [response])
    monkeypatch.setattr(sampling, "sample", fake)
    predict_cli.main(["--model_path", str(model_dir), "--image", image, "--question", "How many shapes?"])
    assert len(calls) == 1 and calls[0].shape[0] == 1
    assert processing.DECOUPLED_INSTRUCTION in tokenizer.decode(calls[0][0])
    out = capsys.readouterr().out
    fields = printed_fields(out)
    v = int(re.search(r"<vision_confidence>(\d+)<", response).group(1)) / 10
    r = int(re.search(r"<reasoning_confidence>(\d+)<", response).group(1)) / 10
    assert fields["answer"] == sample.answer
    assert float(fields["vision confidence"]) == pytest.approx(v)
    assert float(fields["reasoning confidence"]) == pytest.approx(r)
    assert float(fields["combined confidence"]) == pytest.approx(2 * v * r / (v + r), abs=5e-4)
    assert fields["format ok"] == "True"
    assert out.split("\nresponse:\n")[1].strip() == response


def test_predict_input_errors(predict_world, tmp_path):
    sample, _, model_dir, image, _ = predict_world
    with pytest.raises(FileNotFoundError, match=r"--image .*nope\.png: no such file; pass the path of a PNG"):
        predict_cli.main(["--model_path", str(model_dir), "--image", str(tmp_path / "nope.png"), "--question", "q"])
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*not a readable image"):
        predict_cli.main(["--model_path", str(model_dir), "--image", str(not_an_image), "--question", "q"])
    with pytest.raises(FileNotFoundError, match=r"no_model: no such model directory.*huggingface-cli download"):
        predict_cli.main(["--model_path", str(tmp_path / "no_model"), "--image", image, "--question", "q"])
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing model.safetensors or .*tokenizer.json.*preprocessor_config"):
        predict_cli.main(["--model_path", str(partial), "--image", image, "--question", "q"])
    assert os.path.isfile(image)


def test_predict_uses_the_prompt_the_model_dir_records(predict_world, tmp_path, capsys, monkeypatch):
    sample, tokenizer, _, image, (config, params, image_config) = predict_world
    model_dir = export.export_model_dir(config, params, tokenizer, image_config, tmp_path / "plain", prompt="plain")
    assert export.saved_prompt(model_dir) == "plain"
    fake, calls = fake_generation(tokenizer, [f"<think>I count.</think> \\boxed{{{sample.answer}}}"])
    monkeypatch.setattr(sampling, "sample", fake)
    prediction = predict_cli.main(["--model_path", model_dir, "--image", image, "--question", sample.question,
                                   "--mode", "plain"])
    prompt = tokenizer.decode(calls[0][0])
    assert processing.PLAIN_INSTRUCTION in prompt and "<vision_confidence>" not in prompt
    assert prediction["answer"] == sample.answer and prediction["format_ok"] and prediction["confidence"] is None
    assert printed_fields(capsys.readouterr().out)["combined confidence"] == "missing"
