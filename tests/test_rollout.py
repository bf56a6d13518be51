"""rl.rollout host side: response bytes -> text, token offsets and the `<vision>` token mask."""

import random

import numpy as np
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from vlcal_jax.rl import rewards, rollout
from vlcal_jax.rl.format import parse_response


class ByteLevelTokenizer:
    """Stand-in for a byte-level BPE tokenizer whose token i is the byte string pieces[i]
    (GPT-2's byte-to-character table, as Qwen's tokenizer uses)."""

    added_tokens_decoder = {}

    def __init__(self, pieces):
        table = bytes_to_unicode()
        self.pieces = ["".join(table[b] for b in piece) for piece in pieces]

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


def vision_mask_of(pieces, mode="decoupled"):
    pieces = [p.encode() if isinstance(p, str) else p for p in pieces]
    tokenizer = ByteLevelTokenizer(pieces)
    text, offsets = rollout.decode_with_offsets(tokenizer, list(range(len(pieces))))
    mask, parsed = rollout.vision_token_mask(text, offsets, mode)
    return text, mask.astype(int).tolist(), parsed


def test_vision_mask_after_an_invalid_utf8_byte():
    text, mask, parsed = vision_mask_of([b"\xe4", "<think>", "<vision>", "ab", "cd", "</vision>"])
    assert text == "\ufffd<think><vision>abcd</vision>"
    assert parsed.vision == "abcd"
    assert mask == [0, 0, 0, 1, 1, 0]


def test_vision_mask_with_characters_split_across_tokens():
    # "中" is 3 bytes split over two tokens; a truncated 2-byte prefix of it is one U+FFFD.
    text, mask, _ = vision_mask_of([b"\xe4\xb8", "<vision>", "a", b"\xe4\xb8", b"\xad", "b", b"\xff",
                                    "</vision>", b"\xe4"])
    assert text == "\ufffd<vision>a中b\ufffd</vision>\ufffd"
    assert mask == [0, 0, 1, 1, 1, 1, 1, 0, 0]


def test_vision_mask_matches_byte_overlap_on_random_byte_strings():
    # Reference: a token is in the mask iff its bytes overlap the bytes of the vision content,
    # computed on the bytes alone. Prefix and content mix valid, split and invalid UTF-8.
    rng = random.Random(0)
    alphabet = [b"a", b"Z", b"7", "é".encode(), "中".encode(), "😀".encode(), b"\xe4", b"\xe4\xb8", b"\xff",
                b"\x80", b"\xf0\x9f", b".", b","]
    for _ in range(400):
        prefix = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        content = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        data = prefix + b"<think><vision>" + content + b"</vision><reasoning>r</reasoning></think>"
        start = len(prefix) + len(b"<think><vision>")
        end = start + len(content)
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(12, len(data) - 1))))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        text, mask, _ = vision_mask_of(pieces)
        assert text == data.decode("utf-8", errors="replace")
        bounds = np.cumsum([0] + [len(p) for p in pieces])
        expected = [int(a < end and b > start) for a, b in zip(bounds[:-1], bounds[1:])]
        assert mask == expected, pieces


@pytest.mark.parametrize("vision", ["", "  \n "])
def test_empty_vision_span_is_no_span(vision):
    # The release finds no vision tokens in an empty span: no soft label, R_vis = -1.
    response = (f"<think><vision>{vision}</vision><reasoning>Count.</reasoning></think>\\boxed{{4}}"
                "<analysis>ok</analysis><confidence><vision_confidence>8</vision_confidence>"
                "<reasoning_confidence>6</reasoning_confidence></confidence>")
    parsed = parse_response(response)
    assert parsed.format_ok and not parsed.has_vision
    assert parsed.vision is None and parsed.vision_char_span is None
    start = response.index("<vision>") + len("<vision")
    end = response.index("</vision>") + len("</")
    # One token straddles the empty span ("></" or "> \n </").
    pieces = [response[:start], response[start:end], response[end:]]
    _, mask, _ = vision_mask_of(pieces)
    assert mask == [0, 0, 0]
    other = response.replace(f"<vision>{vision}</vision>", "<vision>four apples</vision>")
    out = rewards.vl_calibration([response, other], ["4", "4"], vision_kl=np.array([0.5, 0.2]),
                                 vision_entropy=np.array([1.0, 1.0]))
    assert out["has_vision"].tolist() == [False, True]
    assert np.isnan(out["soft_label"][0]) and out["r_vis"][0] == -1.0
    assert out["soft_label"][1] == 0.5
