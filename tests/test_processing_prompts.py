"""Chat prompts against transformers: its jinja rendering of the template + Qwen3VLProcessor."""

import re

import numpy as np
import PIL.Image
import pytest
import transformers
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlcal_jax import processing

CFG = processing.ImageProcessorConfig.qwen3_vl(min_pixels=32 * 32, max_pixels=160 * 160)


class ImageOnlyQwen3VLProcessor(transformers.Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor (which needs torchvision)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def tokenizers_and_processor(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("prompt_tokenizer")
    corpus = list(processing.INSTRUCTIONS.values()) + ["Which shape is larger? How many red cubes?"] * 3
    ours = processing.train_demo_tokenizer(corpus, 400, out_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": CFG.min_pixels, "longest_edge": CFG.max_pixels}, patch_size=CFG.patch_size,
        temporal_patch_size=CFG.temporal_patch_size, merge_size=CFG.merge_size,
        image_mean=list(CFG.image_mean), image_std=list(CFG.image_std))
    processor = ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                          chat_template=processing.QWEN3_VL_CHAT_TEMPLATE)
    return ours, hf_tokenizer, processor


def images(*sizes):
    rng = np.random.default_rng(len(sizes))
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


CASES = [  # (question, image sizes, mode, system)
    ("What is the area of the shaded region?", [(50, 70)], "decoupled", None),
    ("Compare <image> with <image>. Which has more cubes?", [(40, 40), (200, 90)], "decoupled", None),
    ("<image>\nHow many spheres?", [(120, 33)], "rlcr", "You are a careful assistant."),
    ("What is 17 * 3?", [], "plain", None),
    ("Describe both.", [(64, 64), (20, 150)], "plain", "Be brief."),
]


@pytest.mark.parametrize("question,sizes,mode,system", CASES)
def test_prompt_ids_match_hf_processor(tokenizers_and_processor, question, sizes, mode, system):
    ours, hf_tokenizer, processor = tokenizers_and_processor
    messages = processing.build_chat(question, len(sizes), mode=mode, system=system)
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = images(*sizes)
    expected = processor(text=[text], images=batch or None, return_tensors="np")
    pixel_values, grid_thw = processing.preprocess_images(batch, CFG)
    prompt = processing.render_prompt(messages, grid_thw, CFG.merge_size)
    input_ids, attention_mask = processing.encode_prompts(ours, [prompt])
    np.testing.assert_array_equal(input_ids, expected["input_ids"])
    np.testing.assert_array_equal(attention_mask, expected["attention_mask"])
    if sizes:
        np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
        np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    pad_id = ours.convert_tokens_to_ids("<|image_pad|>")
    assert (input_ids == pad_id).sum() == processing.num_image_tokens(grid_thw, CFG.merge_size).sum()
    assert prompt.startswith("<|im_start|>system\n" if system else "<|im_start|>user\n")
    assert prompt.endswith(processing.INSTRUCTIONS[mode] + "<|im_end|>\n<|im_start|>assistant\n")


def test_left_padded_batch_matches_hf_processor(tokenizers_and_processor):
    ours, hf_tokenizer, processor = tokenizers_and_processor
    questions, sizes = ["A <image> B", "Short?", "Two: <image><image>"], [(50, 50), (90, 30), (33, 200)]
    chats = [processing.build_chat(q, q.count("<image>")) for q in questions]
    batch, taken = images(*sizes), [[0], [], [1, 2]]
    texts = [hf_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    expected = processor(text=texts, images=batch, padding=True, padding_side="left", return_tensors="np")
    _, grid_thw = processing.preprocess_images(batch, CFG)
    prompts = [processing.render_prompt(c, grid_thw[t], CFG.merge_size) for c, t in zip(chats, taken)]
    input_ids, attention_mask = processing.encode_prompts(ours, prompts)
    np.testing.assert_array_equal(input_ids, expected["input_ids"])
    np.testing.assert_array_equal(attention_mask, expected["attention_mask"])


def test_text_rendering_matches_jinja_template(tokenizers_and_processor):
    _, hf_tokenizer, _ = tokenizers_and_processor
    conversations = [
        [{"role": "system", "content": [{"type": "text", "text": "sys "}, {"type": "text", "text": "two"}]},
         {"role": "user", "content": "plain string question"},
         {"role": "assistant", "content": "<think>\nok\n</think>\n\\boxed{1}"},
         {"role": "user", "content": [{"type": "text", "text": "and again?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "answer"}]}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert processing.render_prompt(messages, [], 2, add_generation_prompt) == expected


def test_build_chat_places_images():
    chat = processing.build_chat("Look <image> here and <image>.", 2, mode="plain")
    kinds = [item["type"] for item in chat[0]["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert chat[0]["content"][0]["text"] == "Look "
    chat = processing.build_chat("<image>What?", 1)
    assert [item["type"] for item in chat[0]["content"]] == ["image", "text"]
    chat = processing.build_chat("  What?  ", 2, system="S")
    assert chat[0] == {"role": "system", "content": "S"}
    assert [item["type"] for item in chat[1]["content"]] == ["image", "image", "text"]
    assert chat[1]["content"][-1]["text"] == "What? " + processing.DECOUPLED_INSTRUCTION
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        processing.build_chat("<image> what?", 2)
    with pytest.raises(ValueError, match="unknown prompt mode 'rlvr'"):
        processing.build_chat("what?", 0, mode="rlvr")
    with pytest.raises(ValueError, match="2 images but 1 grids"):
        processing.render_prompt(processing.build_chat("q", 2), [[1, 2, 2]], 2)
    with pytest.raises(ValueError, match="system message must come first"):
        processing.render_prompt([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], [], 2)


def _format_block(instruction):
    return instruction.split("Use this format:\n", 1)[1]


def test_decoupled_instruction_asks_for_the_paper_format():
    # PAPER.md section 2: the format is valid when the tags come in this order with \boxed{}
    # between </think> and <analysis>, and both scores are numbers in [0, 10].
    paper_format = re.compile(
        r"<think>.*?<vision>.*?</vision>.*?<reasoning>.*?</reasoning>.*?</think>.*?\\boxed\{.*?\}.*?"
        r"<analysis>.*?</analysis>.*?<confidence>.*?<vision_confidence>(.*?)</vision_confidence>.*?"
        r"<reasoning_confidence>(.*?)</reasoning_confidence>.*?</confidence>", re.DOTALL)
    filled = _format_block(processing.DECOUPLED_INSTRUCTION).replace("...", "7")
    match = paper_format.search(re.sub(r"\s*(<|>|/)\s*", r"\1", filled))
    assert match and all(0 <= float(score) <= 10 for score in match.groups())
    assert "0 to 10" in processing.DECOUPLED_INSTRUCTION
    rlcr = _format_block(processing.RLCR_INSTRUCTION)
    assert re.search(r"</think>.*\\boxed\{.*<analysis>.*</analysis>.*<confidence>.*</confidence>", rlcr, re.DOTALL)
    assert "vision" not in processing.RLCR_INSTRUCTION
    assert "<think> </think>" in processing.PLAIN_INSTRUCTION and "\\boxed{}" in processing.PLAIN_INSTRUCTION
    assert "confidence" not in processing.PLAIN_INSTRUCTION
