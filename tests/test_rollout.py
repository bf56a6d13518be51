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


def _after_answer_rows(rows):
    """rows: lists of string pieces -> (tokenizer over every piece, tokens [N, M], lengths [N])."""
    pieces = sorted({p for row in rows for p in row})
    tokenizer = ByteLevelTokenizer([p.encode() for p in pieces])
    width = max(len(row) for row in rows) + 1
    tokens = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = [pieces.index(p) for p in row]
    return tokenizer, tokens, np.array([len(row) for row in rows])


def test_after_answer_mask_starts_after_the_graded_answer():
    tail = ["<analysis>", "ok", "</analysis>", "<confidence><vision_confidence>", "7", "</vision_confidence>",
            "<reasoning_confidence>", "6", "</reasoning_confidence></confidence>"]
    rows = [
        ["<think>r</think>", "\\boxed{", "1", "2", "}", *tail],
        # whitespace around the tags is normalised away by the parser, not by the mask
        ["<think>r</think>", " \\boxed{", "4 ", "} ", "\n<analysis>", "ok", "</analysis>"],
        # the LAST \boxed{} is graded: an earlier one in the reasoning does not end the answer
        ["<think>\\boxed{3}", " then", "</think>", "\\boxed{", "5", "}<", "analysis>x</analysis>"],
        ["<think>r</think>", "\\boxed{", "1", *tail],  # unclosed: no answer, nothing after it
        ["<think>r</think>", "no box", *tail],
    ]
    tokenizer, tokens, lengths = _after_answer_rows(rows)
    mask = rollout.after_answer_mask(tokenizer, tokens, lengths)
    got = [mask[i, :len(row)].astype(int).tolist() for i, row in enumerate(rows)]
    assert got[0] == [0] * 5 + [1] * len(tail)
    assert got[1] == [0, 0, 0, 0, 1, 1, 1]
    assert got[2] == [0] * 6 + [1]  # "}<" holds the closing brace: it belongs to the answer
    assert got[3] == [0] * len(rows[3]) and got[4] == [0] * len(rows[4])
    assert not mask[:, -1].any()  # padding
    # reference: a token is after the answer iff its first byte is past the closing brace
    for i, row in enumerate(rows[:3]):
        text = "".join(row)
        close = parse_response(text).answer_char_end
        starts = np.cumsum([0] + [len(p) for p in row])[:-1]
        assert got[i] == [int(s >= close) for s in starts]


def test_confidence_token_mask_marks_each_scores_first_token():
    rows = [
        ["<think>r</think>\\boxed{1}<analysis>ok</analysis>", "<confidence><vision_confidence>", "1", "0",
         "</vision_confidence>", "<reasoning_confidence> ", "6", "</reasoning_confidence></confidence>"],
        # a token that holds the tag and the digit; whitespace inside the tag
        ["<analysis>ok</analysis><confidence>", "< vision_confidence >7", "</vision_confidence>"],
        ["<think>no scores</think>", "\\boxed{2}"],
    ]
    tokenizer, tokens, lengths = _after_answer_rows(rows)
    mask = rollout.confidence_token_mask(tokenizer, tokens, lengths)
    got = [mask[i, :len(row)].astype(int).tolist() for i, row in enumerate(rows)]
    assert got == [[0, 0, 1, 0, 0, 0, 1, 0], [0, 1, 0], [0, 0]]
    assert not mask[:, -1].any()
    rlcr = rollout.confidence_token_mask(tokenizer, tokens, lengths, mode="rlcr")
    assert not rlcr.any()  # no bare <confidence>N in these rows
    tokenizer, tokens, lengths = _after_answer_rows([["\\boxed{1}<analysis>a</analysis><confidence>", "8",
                                                      "</confidence>"]])
    assert rollout.confidence_token_mask(tokenizer, tokens, lengths, mode="rlcr")[0, :3].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="mode="):
        rollout.confidence_token_mask(tokenizer, tokens, lengths, mode="nope")


def test_post_answer_advantages_of_the_loop():
    from vlcal_jax.training import loop

    body = ["<think>r</think>", "\\boxed{", "1", "}", "<analysis>", "ok", "</analysis>"]
    tokenizer, tokens, lengths = _after_answer_rows([body, body[:3], body, body])
    n = 2
    response_mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
    out = {"advantage": np.array([1.0, -1.0, 0.5, -0.5]), "reward": np.array([0.8, -1.0, 1.7, 0.9]),
           "accuracy_reward": np.array([1.0, 0.0, 1.0, 1.0]), "accuracy": np.array([1.0, 0.0, 1.0, 1.0])}
    shared = loop.post_answer_advantages("shared", out, tokens, lengths, tokenizer, "decoupled", n, response_mask)
    np.testing.assert_array_equal(shared, out["advantage"])
    got = loop.post_answer_advantages("reward_to_go", out, tokens, lengths, tokenizer, "decoupled", n,
                                      response_mask)
    # group 2 is two right answers with C = 0.7 and -0.1 (mean 0.3); group 1's are alone: 0
    expected = np.zeros(tokens.shape, np.float32)
    for row, (before, after) in enumerate([(1.0, 0.0), (-1.0, 0.0), (0.5, 0.4), (-0.5, -0.4)]):
        expected[row, :lengths[row]] = before
        if row != 1:
            expected[row, 4:lengths[row]] = after
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="post_answer_advantage"):
        loop.post_answer_advantages("mean", out, tokens, lengths, tokenizer, "decoupled", n, response_mask)


def test_score_counterfactuals_rewrite_each_whole_score_as_each_digit():
    rows = [
        ["<think>r</think>\\boxed{1}<analysis>ok</analysis>", "<confidence><vision_confidence>", "1", "0",
         "</vision_confidence>", "<reasoning_confidence> ", "6", "</reasoning_confidence></confidence>"],
        ["<analysis>ok</analysis><confidence>", "< vision_confidence >7", "</vision_confidence>"],
        ["<think>no scores</think>", "\\boxed{2}"],
    ]
    tokenizer, tokens, lengths = _after_answer_rows(rows)
    positions, texts, counterfactual = rollout.score_counterfactuals(tokenizer, tokens, lengths)
    assert positions.tolist() == [[2, 6], [1, -1], [-1, -1]]
    assert texts == ["".join(row) for row in rows]
    assert len(counterfactual) == 2 and all(len(per_tag) == 10 for per_tag in counterfactual)
    # the whole "10" becomes the digit; the other score and the rest of the text stay
    assert counterfactual[0][3][0] == texts[0].replace("<vision_confidence>10<", "<vision_confidence>3<")
    assert parse_response(counterfactual[0][3][0]).vision_confidence == 0.3
    assert parse_response(counterfactual[1][0][0]).reasoning_confidence == 0.0
    assert counterfactual[0][9][1] == texts[1].replace(">7<", ">9<")
    assert counterfactual[1][9][1] == texts[1] and counterfactual[0][5][2] == texts[2]  # no such score: unchanged
    tokenizer, tokens, lengths = _after_answer_rows([["\\boxed{1}<analysis>a</analysis><confidence>", "8",
                                                      "</confidence>"]])
    positions, _, counterfactual = rollout.score_counterfactuals(tokenizer, tokens, lengths, mode="rlcr")
    assert positions.tolist() == [[1]] and parse_response(counterfactual[0][4][0], "rlcr").confidence == 0.4
    with pytest.raises(ValueError, match="mode="):
        rollout.score_counterfactuals(tokenizer, tokens, lengths, mode="nope")


class DigitTokenizer(ByteLevelTokenizer):
    def __init__(self, pieces):
        super().__init__([p.encode() for p in pieces])
        self.index = {p: i for i, p in enumerate(pieces)}

    def encode(self, text, add_special_tokens=False):
        return [self.index[text]]


@pytest.mark.parametrize("kind", ["shared", "reward_to_go"])
def test_score_expectation_batch_takes_each_digits_reward(kind):
    """loop.score_expectation_batch on a group of two: the counterfactual rewards are PAPER.md
    section 3's with the score rewritten (checked against the formula written out here), scaled as
    the token's advantage was made; "1" of "10" is not a known digit, so its sampled term stays."""
    import types

    import ml_collections

    from vlcal_jax.rl import grpo
    from vlcal_jax.training import loop

    def pieces(answer, v, r):
        head = (f"<think><vision>I see four apples.</vision><reasoning>Count them.</reasoning></think> The answer "
                f"is \\boxed{{{answer}}}. <analysis>Clear image.</analysis><confidence><vision_confidence>")
        return [head, *v, "</vision_confidence><reasoning_confidence>", r, "</reasoning_confidence></confidence>"]

    rows = [pieces("4", "8", "6"), pieces("3", "10", "5")]
    vocab = sorted({p for row in rows for p in row} | set("0123456789"))
    tokenizer = DigitTokenizer(vocab)
    tokens = np.zeros((2, 7), np.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = [vocab.index(p) for p in row]
    lengths = np.array([len(row) for row in rows])
    texts = ["".join(row) for row in rows]
    labels = np.array([0.7, 0.2])
    example = types.SimpleNamespace(answer="4", choices=None)
    out = rollout.score_rewards(texts, [example], 2, soft_label=labels)
    assert out["format"].tolist() == [1.0, 1.0] and out["accuracy"].tolist() == [1.0, 0.0]
    r = ml_collections.ConfigDict(dict(mode="decoupled", reward="vl_calibration", post_answer_advantage=kind,
                                       post_answer_weight=0.5,
                                       reward_weights=dict(lambda_acc=1.0, lambda_cal=2.0, lambda_fmt=0.4,
                                                           lambda_vis=0.4)))
    response = (np.arange(7)[None] < lengths[:, None]).astype(np.float32)
    advantages = loop.post_answer_advantages(kind, out, tokens, lengths, tokenizer, "decoupled", 2, response,
                                             weight=0.5)
    token_adv, positions, score_adv, counts = loop.score_expectation_batch(
        r, tokenizer, out, [example], tokens, lengths, advantages, response, 2)

    def reward(correct, v, rc, label):
        phi = 0.0 if v == 0 or rc == 0 else 2 * v * rc / (v + rc)
        return correct - 2.0 * (phi - correct) ** 2 + 0.4 - 0.4 * (v - label) ** 2

    assert positions.tolist() == [[1, 3], [1, 4]]
    own = [(1.0, 0.8, 0.6, 0.7), (0.0, 1.0, 0.5, 0.2)]
    np.testing.assert_allclose(out["reward"], [reward(*o) for o in own], rtol=1e-6)
    scale = 0.5 if kind == "reward_to_go" else float(grpo.group_scales(np.asarray(out["reward"], np.float32), 2)[0])
    full = np.asarray(grpo.token_advantages(np.asarray(advantages, np.float32), response > 0))
    for i, (correct, v, rc, label) in enumerate(own):
        for j in range(2):
            a_t = full[i, positions[i, j]]
            for k in range(10):
                alt = (correct, k / 10, rc, label) if j == 0 else (correct, v, k / 10, label)
                want = 0.0 if k == 1 else a_t + scale * (reward(*alt) - reward(*own[i]))
                assert score_adv[i, j, k] == pytest.approx(want, rel=1e-5, abs=1e-5)
    cleared = [token_adv[i, positions[i, j]] for i in range(2) for j in range(2)]
    assert cleared[0] == cleared[1] == cleared[3] == 0.0  # 8, 6, 5: known digits
    assert cleared[2] == pytest.approx(full[1, 1]) and counts.tolist() == [[3, 4]]  # the "1" of "10" keeps its own
