"""Tokenizer glue: the demo BPE against transformers' own loading, padding, span masks."""

import json

import numpy as np
import pytest
import tokenizers
import transformers

from vlcal_jax import processing

CORPUS = [processing.DECOUPLED_INSTRUCTION, processing.RLCR_INSTRUCTION, processing.PLAIN_INSTRUCTION,
          "In triangle ABC, AB = 3 cm and BC = 4.5 cm. What is the area? Answer: 6.75",
          "The red cube is left of the blue sphere; how many objects are there? 12 apples.",
          "Ünïcode tèxt, 中文字符 and emoji 🙂 also appear."] * 4
TEXTS = ["<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>How many?  Two\n\n<|im_end|>\n",
         "<think>\n<vision>a red cube</vision>\n<reasoning>1+1=2</reasoning>\n</think>\n\\boxed{2}",
         "unseen words: zyxwv qqq ÆØÅ 𝔘 \t tabs\r\n", ""]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo_tokenizer")
    processing.train_demo_tokenizer(CORPUS, 500, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return processing.load_tokenizer(demo_dir)


def test_demo_tokenizer_loads_in_transformers_identically(demo_dir, tokenizer):
    auto = transformers.AutoTokenizer.from_pretrained(str(demo_dir))
    for text in TEXTS + CORPUS[:6]:
        assert tokenizer(text)["input_ids"] == auto(text)["input_ids"], text
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (tokenizer.pad_token, tokenizer.eos_token) == (auto.pad_token, auto.eos_token) == (
        "<|endoftext|>", "<|im_end|>")
    assert tokenizer.pad_token_id == auto.pad_token_id and tokenizer.eos_token_id == auto.eos_token_id
    assert tokenizer.chat_template == auto.chat_template == processing.QWEN3_VL_CHAT_TEMPLATE


def test_added_tokens_follow_the_bpe_vocabulary_in_qwen_order(demo_dir, tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(content) for content, _ in processing.QWEN3_VL_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 26)) and ids[0] <= 500
    assert ids[-2:] == [ids[0] + 24, ids[0] + 25]  # <think>, </think>, as 151667/151668 in Qwen3-VL
    encoded = tokenizer("<think>x</think><|image_pad|><|im_end|>")["input_ids"]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "<think>x</think>"  # think tags are not special
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(ids[12])] == {
        "content": "<|image_pad|>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True}


def test_missing_tokenizer_says_what_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*Qwen3-VL-4B-Instruct"):
        processing.load_tokenizer(tmp_path)


def test_encode_prompts_matches_hf_left_padding(demo_dir, tokenizer):
    prompts = ["short", TEXTS[0], TEXTS[1]]
    input_ids, attention_mask = processing.encode_prompts(tokenizer, prompts)
    expected = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="np")
    assert input_ids.dtype == attention_mask.dtype == np.int32
    np.testing.assert_array_equal(input_ids, expected["input_ids"])
    np.testing.assert_array_equal(attention_mask, expected["attention_mask"])
    raw = tokenizers.Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    np.testing.assert_array_equal(processing.encode_prompts(raw, prompts)[0], input_ids)


def test_encode_prompts_buckets_and_right_padding(tokenizer):
    lengths = [len(tokenizer(p)["input_ids"]) for p in TEXTS[:2]]
    bucket = max(lengths) + 5
    input_ids, attention_mask = processing.encode_prompts(tokenizer, TEXTS[:2], pad_to_bucket=(8, bucket, 4096))
    assert input_ids.shape == (2, bucket)
    assert attention_mask.sum(axis=1).tolist() == lengths
    assert (attention_mask[:, -1] == 1).all() and (input_ids[attention_mask == 0] == tokenizer.pad_token_id).all()
    right_ids, right_mask = processing.encode_prompts(tokenizer, TEXTS[:2], pad_to_bucket=(bucket,), left_pad=False)
    assert (right_mask[:, 0] == 1).all()
    for row in range(2):
        np.testing.assert_array_equal(right_ids[row][right_mask[row] == 1], input_ids[row][attention_mask[row] == 1])
    with pytest.raises(ValueError, match=r"prompts \[1\] have \[\d+\] tokens, more than the largest bucket 8"):
        processing.encode_prompts(tokenizer, ["hi", TEXTS[1]], pad_to_bucket=(4, 8))


def test_char_span_to_token_mask_selects_the_vision_span(tokenizer):
    response = "<think>\n<vision> a red cube, two spheres </vision>\n<reasoning> so 3 </reasoning>\n</think>"
    encoded = tokenizer(response, return_offsets_mapping=True, add_special_tokens=False)
    start = response.index("<vision>") + len("<vision>")
    span = (start, response.index("</vision>"))
    mask = processing.char_span_to_token_mask(encoded["offset_mapping"], span)
    inside = [token for token, keep in zip(encoded["input_ids"], mask) if keep]
    span_text = response[span[0]:span[1]]
    # The smallest contiguous run of tokens that covers the span (a boundary token may
    # also hold a neighbouring character, e.g. " </").
    assert np.ptp(np.flatnonzero(mask)) + 1 == mask.sum()
    assert span_text in tokenizer.decode(inside)
    assert span_text not in tokenizer.decode(inside[1:]) and span_text not in tokenizer.decode(inside[:-1])
    offsets = np.array([[0, 3], [3, 5], [5, 5], [5, 9], [9, 12]])
    assert processing.char_span_to_token_mask(offsets, (4, 9)).tolist() == [False, True, True, True, False]
    assert processing.char_span_to_token_mask(offsets, (3, 3)).tolist() == [False] * 5
