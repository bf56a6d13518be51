"""The warm start's image curriculum (sft.inventory, sft.caption_steps, sft.caption_fraction): the
scene inventory is true of the scene graph and read back by score_perception, caption rows are
the image alone answered by it, and rows are picked by id whatever the batch."""

import collections
import json
import re

import numpy as np

from test_rl_pipeline import world  # noqa: F401  (the tiny scene-world model)
from vlcal_jax.configs import default_config
from vlcal_jax.data import scenes
from vlcal_jax.data.example import Example
from vlcal_jax.rl import rollout
from vlcal_jax.training import warm

CONFIG = scenes.SceneConfig(max_objects=6)
SAMPLES = [scenes.generate_sample(i, 0, CONFIG) for i in range(80)]


def _example(objects, size=64):
    scene = {"image_size": size, "low_contrast": 0.0, "overlap": 0.0, "clutter": [], "objects": objects}
    return Example(id="hand", question="<image>How many?", answer="1", meta={"scene": json.dumps(scene)}, images=[])


def test_inventory_by_hand_groups_in_reading_order():
    objects = [dict(shape="square", color="blue", x=40, y=50), dict(shape="circle", color="red", x=50, y=3),
               dict(shape="square", color="blue", x=5, y=60), dict(shape="circle", color="red", x=3, y=10)]
    # reading order: the top band (y < 16) left to right, then the bottom band; groups in first-seen order
    assert warm.scene_inventory(_example(objects)) == "There are 2 red circles. There are 2 blue squares."
    assert warm.scene_inventory(_example(objects[:1])) == "There is 1 blue square."
    assert warm.scene_inventory(Example(id="x", question="q", answer="a", meta={}, images=[])) == ""


def test_inventory_is_true_of_every_scene_and_complete():
    for sample in SAMPLES:
        example = sample.to_example()
        text = warm.scene_inventory(example)
        stated = scenes.parse_vision_statements(text)  # the project's own reader of vision spans
        counts = collections.Counter((o.color, o.shape) for o in sample.scene.objects)  # the scene graph
        assert {(f.color, f.shape): f.value for f in stated} == dict(counts), (text, sample.scene.objects)
        # nothing it states is wrong, so an inventory never makes a right vision span wrong
        assert not scenes.score_perception(f"<vision>{text}</vision>", example).wrong


def test_inventory_opens_the_vision_span_and_survives_the_format_conversion():
    example = SAMPLES[1].to_example()
    response = scenes.teacher_response(SAMPLES[1])
    added = warm.with_inventory(response, example)
    inventory = warm.scene_inventory(example)
    assert added.startswith(f"<think><vision>{inventory} ") and added.endswith(response[len("<think><vision>"):])
    assert scenes.score_perception(added, example).correct == scenes.score_perception(response, example).correct
    assert inventory in warm.convert_teacher(added, "plain") and inventory in warm.convert_teacher(added, "rlcr")


def test_caption_rows_are_picked_by_id_at_the_configured_share():
    examples = [s.to_example() for s in SAMPLES] * 5
    examples = [Example(id=f"{ex.id}-{k}", question=ex.question, answer=ex.answer, meta=ex.meta, images=ex.images)
                for k, ex in enumerate(examples)]
    picked = [warm.is_caption_row(ex, 0.25) for ex in examples]
    assert 0.18 < np.mean(picked) < 0.32
    assert picked == [warm.is_caption_row(ex, 0.25) for ex in reversed(examples)][::-1]
    assert not any(warm.is_caption_row(ex, 0.0) for ex in examples)
    assert all(warm.is_caption_row(ex, 1.0) for ex in examples)


def test_teacher_rows_turn_picked_rows_into_captions_and_encode(world):  # noqa: F811
    samples, tokenizer, model_config, _, image_config = world
    c = default_config()
    c.sft.inventory, c.sft.caption_fraction, c.rl.prompt = True, 0.5, "decoupled_tiny"
    examples = [s.to_example() for s in samples]
    responses = [scenes.teacher_response(s) for s in samples]
    rows, texts, prompts = warm.teacher_rows(c, examples, responses, warm.formats(c))
    captions = [i for i, ex in enumerate(examples) if warm.is_caption_row(ex, 0.5)]
    assert captions and len(captions) < len(examples)
    for i, (ex, text, prompt) in enumerate(zip(rows, texts, prompts)):
        inventory = warm.scene_inventory(examples[i])
        if i in captions:
            assert ex.question == "<image>" and prompt == warm.CAPTION_PROMPT
            assert text == f"<vision>{inventory}</vision>" and ex.images == examples[i].images
        else:
            assert ex is examples[i] and prompt == c.rl.prompt and text.startswith(f"<think><vision>{inventory} ")
    batch = rollout.encode_examples(rows, tokenizer, model_config, image_config, mode=prompts,
                                    length_buckets=(1024,), num_images=len(rows))
    for i in captions:
        assert "Describe the image." in batch.texts[i] and not re.search(r"How many|Is there|colour", batch.texts[i])


def test_cut_warm_start_rows_are_counted_and_named_once(world, caplog, monkeypatch):  # noqa: F811
    _, tokenizer, _, _, _ = world
    monkeypatch.setattr(warm, "_WARNED_CUTS", set())  # what earlier tests in this process warned about
    inventories = [f"<vision>{warm.scene_inventory(s.to_example())}</vision>" for s in SAMPLES[:20]]
    lengths = np.array([len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in inventories])
    length = int(np.sort(lengths)[10])  # room for the shorter half's tokens and an EOS; the rest are cut
    cut = int(np.sum(lengths >= length))
    assert 0 < cut < len(inventories)
    message = (f"{cut} of 20 warm-start responses in a batch are longer than {length} tokens and are cut (their "
               "tail and end-of-turn are not learnt): raise sft.caption_length")
    with caplog.at_level("WARNING", logger="vlcal_jax.train"):
        warm.encode_responses(tokenizer, inventories, length, 1, 0)  # no knob: silent
        _, kept = warm.encode_responses(tokenizer, inventories, length, 1, 0, knob="sft.caption_length")
        warm.encode_responses(tokenizer, inventories, length, 1, 0, knob="sft.caption_length")  # once
        warm.encode_responses(tokenizer, inventories, int(lengths.max()) + 1, 1, 0, knob="sft.caption_length")
    assert np.array_equal(kept, np.minimum(lengths + 1, length))
    assert [r.getMessage() for r in caplog.records] == [message]
