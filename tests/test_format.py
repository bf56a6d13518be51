"""rl.format: the PAPER.md section 2 layouts, against hand cases and the released regular expressions."""

import random
import re

import pytest

from vlcal_jax.rl.format import normalize_whitespace, parse_response, rlcr_vlm_format_score

GOOD = (
    "<think>\n  <vision> I see a red cube and 1 / 2 of a ball. </vision>\n"
    "  <reasoning>The cube is red.</reasoning>\n</think>\n"
    "So the answer is \\boxed{red}.\n"
    "<analysis> I am fairly sure. </analysis>\n"
    "<confidence>\n  <vision_confidence> 8 </vision_confidence>\n"
    "  <reasoning_confidence>6</reasoning_confidence>\n</confidence>"
)

# The released layout checks, used as the reference for the linear-time search in rl.format.
RELEASED_FORMAT = re.compile(
    r"<think>.*?<vision>.*?</vision>.*?<reasoning>.*?</reasoning>.*?</think>.*?\\boxed\{.*?\}.*?<analysis>.*?"
    r"</analysis>.*?<confidence>.*?<vision_confidence>(.*?)</vision_confidence>.*?<reasoning_confidence>(.*?)"
    r"</reasoning_confidence>.*?</confidence>",
    re.DOTALL,
)
RELEASED_SCORES = re.compile(
    r"<confidence>.*?<vision_confidence>(\d+(?:\.\d+)?)</vision_confidence>.*?<reasoning_confidence>"
    r"(\d+(?:\.\d+)?)</reasoning_confidence>.*?</confidence>",
    re.DOTALL,
)
EASYR1_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
RLCR_VLM_FORMAT = re.compile(  # examples/reward_function/rlcr_vlm.py, used with re.fullmatch
    r"<think>.*?</think>.*?\\boxed\{.*?\}.*?<analysis>.*?</analysis>.*?<confidence>(.*?)</confidence>", re.DOTALL)


def _released_normalize(text):
    return re.sub(r"\s*(<|>|/)\s*", r"\1", text)


def _in_range(text):
    try:
        return 0.0 <= float(text.strip()) <= 10.0
    except ValueError:
        return False


def _released(text):
    text = _released_normalize(text)
    match = RELEASED_FORMAT.search(text)
    fmt = bool(match) and _in_range(match.group(1)) and _in_range(match.group(2))
    scores = RELEASED_SCORES.search(text)
    v = r = None
    if scores and 0 <= float(scores.group(1)) <= 10 and 0 <= float(scores.group(2)) <= 10:
        v, r = float(scores.group(1)) / 10, float(scores.group(2)) / 10
    vision = re.search(r"<vision>(.*?)</vision>", text, re.DOTALL)
    # The released span finder returns no span for empty content (start_idx >= end_idx).
    return fmt, v, r, (vision.group(1) or None) if vision else None, bool(EASYR1_FORMAT.fullmatch(text))


def test_decoupled_response_parts():
    parsed = parse_response(GOOD)
    assert parsed.format_ok
    assert parsed.vision == "I see a red cube and 1/2 of a ball."
    assert parsed.reasoning == "The cube is red."
    assert parsed.answer == "red"
    assert parsed.analysis == "I am fairly sure."
    assert (parsed.vision_confidence, parsed.reasoning_confidence) == (0.8, 0.6)
    assert parsed.confidence is None and parsed.has_vision
    start, end = parsed.vision_char_span
    assert GOOD[start:end] == "I see a red cube and 1 / 2 of a ball."


def test_whitespace_inside_tags_is_normalised():
    text = GOOD.replace("<vision>", "< vision >").replace("</reasoning>", "< / reasoning >")
    parsed = parse_response(text)
    assert parsed.format_ok and parsed.reasoning == "The cube is red."
    start, end = parsed.vision_char_span
    assert text[start:end] == "I see a red cube and 1 / 2 of a ball."


def test_empty_vision_span_is_no_span():
    for vision in ("", "   ", "\n \t"):
        parsed = parse_response(GOOD.replace(" I see a red cube and 1 / 2 of a ball. ", vision))
        assert parsed.format_ok and parsed.vision is None and not parsed.has_vision, repr(vision)
        assert parsed.vision_char_span is None


@pytest.mark.parametrize(
    "change, reason",
    [
        (("<analysis>", "<analyse>"), "missing analysis"),
        (("\\boxed{red}", "red"), "no boxed answer"),
        (("> 8 <", ">11<"), "vision score above 10"),
        (("<reasoning_confidence>6<", "<reasoning_confidence>high<"), "reasoning score not a number"),
        (("<vision>", "<seeing>"), "no vision span"),
    ],
)
def test_invalid_formats(change, reason):
    parsed = parse_response(GOOD.replace(*change))
    assert not parsed.format_ok, reason


def test_boxed_after_analysis_is_invalid_but_still_graded():
    text = "<think><vision>v</vision><reasoning>r</reasoning></think><analysis>a</analysis>\\boxed{3}" \
           "<confidence><vision_confidence>5</vision_confidence><reasoning_confidence>5</reasoning_confidence></confidence>"
    parsed = parse_response(text)
    assert not parsed.format_ok and parsed.answer == "3" and parsed.vision_confidence == 0.5


def test_scores_out_of_range_or_missing_drop_both_confidences():
    assert parse_response(GOOD.replace("> 8 <", ">12<")).vision_confidence is None
    assert parse_response(GOOD.replace("> 8 <", ">12<")).reasoning_confidence is None
    missing = parse_response(GOOD.replace("<reasoning_confidence>6</reasoning_confidence>", ""))
    assert (missing.vision_confidence, missing.reasoning_confidence) == (None, None)
    decimal = parse_response(GOOD.replace("> 8 <", ">7.5<"))
    assert decimal.vision_confidence == 0.75 and decimal.format_ok


def test_rlcr_and_plain_modes():
    rlcr = "<think>t</think>\\boxed{4}<analysis>a</analysis><confidence> 7 </confidence>"
    parsed = parse_response(rlcr, "rlcr")
    assert parsed.format_ok and parsed.confidence == 0.7 and parsed.raw_confidence == 7.0 and parsed.answer == "4"
    high = parse_response(rlcr.replace(" 7 ", "15"), "rlcr")
    assert not high.format_ok and high.confidence is None and high.raw_confidence == 15.0
    assert parse_response("<think>t</think> so \\boxed{4}.", "plain").format_ok
    assert not parse_response("x <think>t</think> \\boxed{4}", "plain").format_ok
    assert not parse_response("<think>t</think> 4", "plain").format_ok
    with pytest.raises(ValueError, match="mode"):
        parse_response(rlcr, "json")


def test_matches_released_regular_expressions_on_random_layouts():
    pieces = ["<think>", "</think>", "<vision>", "</vision>", "<reasoning>", "</reasoning>", "\\boxed{", "}", "{",
              "<analysis>", "</analysis>", "<confidence>", "</confidence>", "<vision_confidence>",
              "</vision_confidence>", "<reasoning_confidence>", "</reasoning_confidence>", "7", "10", "3.5", "11",
              "x", " ", "\n", " / ", "< ", " >", "ab c"]
    skeleton = ["<think>", "<vision>", "v", "</vision>", "<reasoning>", "r", "</reasoning>", "</think>", "\\boxed{",
                "2", "}", "<analysis>", "a", "</analysis>", "<confidence>", "<vision_confidence>", "7",
                "</vision_confidence>", "<reasoning_confidence>", "3.5", "</reasoning_confidence>", "</confidence>"]
    rng = random.Random(0)
    for trial in range(3000):
        if trial % 2:
            tokens = [rng.choice(pieces) for _ in range(rng.randint(0, 24))]
        else:
            tokens = list(skeleton)
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                if op < 0.4:
                    tokens.insert(rng.randint(0, len(tokens)), rng.choice(pieces))
                elif op < 0.7 and tokens:
                    tokens.pop(rng.randrange(len(tokens)))
                elif tokens:
                    tokens[rng.randrange(len(tokens))] = rng.choice(pieces)
        text = "".join(tokens)
        fmt, v, r, vision, plain = _released(text)
        parsed = parse_response(text)
        assert (parsed.format_ok, parsed.vision_confidence, parsed.reasoning_confidence, parsed.vision) == \
            (fmt, v, r, vision), text
        assert parse_response(text, "plain").format_ok == plain, text
        if parsed.has_vision:
            start, end = parsed.vision_char_span
            assert normalize_whitespace(text[start:end])[0] == parsed.vision, text


def _released_rlcr_vlm_format(text):
    match = RLCR_VLM_FORMAT.fullmatch(_released_normalize(text))
    if not match:
        return 0.0
    try:
        value = float(match.group(1).strip())
    except ValueError:
        return 0.0
    return 1.0 if 1.0 <= value <= 10.0 else 0.5


def test_rlcr_vlm_format_matches_released_fullmatch_on_random_layouts():
    pieces = ["<think>", "</think>", "\\boxed{", "}", "{", "<analysis>", "</analysis>", "<confidence>",
              "</confidence>", "0", "7", "10", "3.5", "12", "x", " ", "\n", " / ", "< ", " >", "ab c"]
    skeleton = ["<think>", "t", "</think>", "\\boxed{", "2", "}", "<analysis>", "a", "</analysis>", "<confidence>",
                "7", "</confidence>"]
    rng = random.Random(1)
    for trial in range(3000):
        tokens = list(skeleton) if trial % 2 == 0 else [rng.choice(pieces) for _ in range(rng.randint(0, 16))]
        for _ in range(rng.randint(0 if trial % 2 else 1, 3)):
            op = rng.random()
            if op < 0.4:
                tokens.insert(rng.randint(0, len(tokens)), rng.choice(pieces))
            elif op < 0.7 and tokens:
                tokens.pop(rng.randrange(len(tokens)))
            elif tokens:
                tokens[rng.randrange(len(tokens))] = rng.choice(pieces)
        text = "".join(tokens)
        assert rlcr_vlm_format_score(normalize_whitespace(text)[0]) == _released_rlcr_vlm_format(text), text


def test_normalize_whitespace_index_map():
    text = "a < b / c >  d"
    normalized, source = normalize_whitespace(text)
    assert normalized == _released_normalize(text) == "a<b/c>d"
    assert [text[i] for i in source[:-1]] == list(normalized) and source[-1] == len(text)


def test_long_malformed_response_parses():
    text = "<think><vision>x</vision><reasoning>y</reasoning>" * 4000 + "<confidence>" * 2000
    parsed = parse_response(text)
    assert not parsed.format_ok and parsed.vision == "x" and parsed.vision_confidence is None
