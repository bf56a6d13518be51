"""Parsing the policy's output format (PAPER.md section 2).

Three layouts:
- "decoupled" (VL-Calibration): `<think><vision>..</vision><reasoning>..</reasoning></think>`,
  `\\boxed{answer}`, `<analysis>..</analysis>`, `<confidence><vision_confidence>0..10
  </vision_confidence><reasoning_confidence>0..10</reasoning_confidence></confidence>`.
- "rlcr": the same with a single `<confidence>0..10</confidence>`.
- "plain" (RLVR, EasyR1): `<think>..</think>` then `\\boxed{answer}`.

As in the released code, whitespace around `<`, `>` and `/` is removed before parsing
(`re.sub(r"\\s*(<|>|/)\\s*", r"\\1", text)`). Tags are located with plain left-to-right
string search, which picks exactly the match the released lazy regular expressions pick
(first opening tag, then the earliest occurrence of each following literal) but in linear
time: the nested lazy regexes backtrack polynomially on long malformed outputs.
"""

from __future__ import annotations

import dataclasses
import re

from vlcal_jax.rl.grading import boxed_span

MODES = ("decoupled", "rlcr", "plain")
_AROUND_TAG_CHARS = re.compile(r"\s*(<|>|/)\s*")
_NUMBER = r"(\d+(?:\.\d+)?)"
_VISION_SCORE = re.compile(rf"<vision_confidence>{_NUMBER}</vision_confidence>")
_REASONING_SCORE = re.compile(rf"<reasoning_confidence>{_NUMBER}</reasoning_confidence>")
_SINGLE_SCORE = re.compile(rf"<confidence>{_NUMBER}</confidence>")
_DECOUPLED_LAYOUT = (
    "<think>", "<vision>", "</vision>", "<reasoning>", "</reasoning>", "</think>", "\\boxed{", "}",
    "<analysis>", "</analysis>", "<confidence>", "<vision_confidence>", "</vision_confidence>",
    "<reasoning_confidence>", "</reasoning_confidence>", "</confidence>",
)
_RLCR_LAYOUT = ("<think>", "</think>", "\\boxed{", "}", "<analysis>", "</analysis>", "<confidence>", "</confidence>")
_PLAIN_LAYOUT = ("<think>", "</think>", "\\boxed{", "}")


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """The parts of one response. Texts are taken from the whitespace-normalised response.

    vision_char_span: (start, end) of the `<vision>` content in the ORIGINAL text, end
    exclusive, without the whitespace next to the tags (which normalisation removes).
    To get the vision-token mask, decode the response tokens, take each token's character
    range (the tokenizer's offset mapping on this same text, or the cumulative lengths of
    the decoded tokens) and mark the tokens whose range overlaps [start, end). None, and
    `vision` None, when there is no `<vision>...</vision>` or its content is empty or only
    whitespace: as in the released code, such a response has no vision tokens, so it gets
    no soft label and R_vis = -1 (its format can still be valid).
    answer_char_end: the index in the ORIGINAL text just after the closing brace of the graded
    (last) `\\boxed{}`: every character from there on comes after the answer and cannot change
    whether it is right. None when there is no closed `\\boxed{}`.
    Confidences are the written 0..10 scores divided by 10, or None when missing or out of
    range; `raw_confidence` is the RLCR score as written (before the range check).
    """

    mode: str
    text: str
    vision: str | None
    reasoning: str | None
    answer: str | None
    analysis: str | None
    vision_confidence: float | None
    reasoning_confidence: float | None
    confidence: float | None
    raw_confidence: float | None
    format_ok: bool
    vision_char_span: tuple[int, int] | None
    answer_char_end: int | None = None

    @property
    def has_vision(self) -> bool:
        return self.vision_char_span is not None


def normalize_whitespace(text: str) -> tuple[str, list[int]]:
    """Removes whitespace around `<`, `>`, `/`; returns the text and `source [len + 1]`, the
    original index of every normalised character (plus len(text) as the end sentinel)."""
    pieces, source, last = [], [], 0
    for match in _AROUND_TAG_CHARS.finditer(text):
        pieces.append(text[last : match.start()])
        source.extend(range(last, match.start()))
        pieces.append(match.group(1))
        source.append(match.start(1))
        last = match.end()
    pieces.append(text[last:])
    source.extend(range(last, len(text)))
    source.append(len(text))
    return "".join(pieces), source


def _find_in_order(text: str, literals: tuple[str, ...], start: int = 0) -> list[tuple[int, int]] | None:
    """(start, end) of each literal, each searched after the previous one; None if one is missing."""
    found, position = [], start
    for literal in literals:
        index = text.find(literal, position)
        if index < 0:
            return None
        position = index + len(literal)
        found.append((index, position))
    return found


def _between(text: str, spans: list[tuple[int, int]], i: int) -> str:
    """Text between literal i and literal i + 1 of a `_find_in_order` result."""
    return text[spans[i][1] : spans[i + 1][0]]


def _score_in_range(text: str) -> bool:
    try:
        value = float(text.strip())
    except ValueError:
        return False
    return 0.0 <= value <= 10.0


def _tag_content(text: str, tag: str) -> tuple[str, int, int] | None:
    spans = _find_in_order(text, (f"<{tag}>", f"</{tag}>"))
    if spans is None:
        return None
    return _between(text, spans, 0), spans[0][1], spans[1][0]


def _decoupled_scores(text: str) -> tuple[float | None, float | None]:
    """The released `extract_confidence`: both scores parsed inside `<confidence>`, each in [0, 10]."""
    opening = text.find("<confidence>")
    if opening < 0:
        return None, None
    vision = _VISION_SCORE.search(text, opening + len("<confidence>"))
    if vision is None:
        return None, None
    reasoning = _REASONING_SCORE.search(text, vision.end())
    if reasoning is None or text.find("</confidence>", reasoning.end()) < 0:
        return None, None
    v, r = float(vision.group(1)), float(reasoning.group(1))
    if not (0.0 <= v <= 10.0 and 0.0 <= r <= 10.0):
        return None, None
    return v / 10.0, r / 10.0


def _format_ok(text: str, mode: str) -> bool:
    if mode == "plain":
        # EasyR1: re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", text, re.DOTALL).
        return text.startswith("<think>") and _find_in_order(text, _PLAIN_LAYOUT[1:], len("<think>")) is not None
    layout = _DECOUPLED_LAYOUT if mode == "decoupled" else _RLCR_LAYOUT
    spans = _find_in_order(text, layout)
    if spans is None:
        return False
    if mode == "decoupled":
        return _score_in_range(_between(text, spans, 11)) and _score_in_range(_between(text, spans, 13))
    return _score_in_range(_between(text, spans, 6))


def rlcr_vlm_format_score(normalized: str) -> float:
    """The authors' VLM RLCR format term (PAPER.md section 3) of a whitespace-normalised response.

    As released (`re.fullmatch` of `<think>.*?</think>.*?\\\\boxed\\{.*?\\}.*?<analysis>.*?
    </analysis>.*?<confidence>(.*?)</confidence>`): the WHOLE response must have this layout,
    ending with `</confidence>`; the score c between the tags gives 1.0 if 1 <= c <= 10, 0.5 if
    it is any other number, and 0.0 if it is not a number or the layout does not match.
    """
    closing = len(normalized) - len("</confidence>")
    if not (normalized.startswith("<think>") and normalized.endswith("</confidence>")):
        return 0.0
    spans = _find_in_order(normalized, _RLCR_LAYOUT[1:-1], len("<think>"))
    if spans is None or spans[-1][1] > closing:
        return 0.0
    try:
        value = float(normalized[spans[-1][1] : closing].strip())
    except ValueError:
        return 0.0
    return 1.0 if 1.0 <= value <= 10.0 else 0.5


def parse_response(text: str, mode: str = "decoupled") -> ParsedResponse:
    """Splits one response into its parts; `mode` is "decoupled", "rlcr" or "plain"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(text, str):
        raise TypeError(f"response must be a str, got {type(text).__name__}; decode the tokens first")
    normalized, source = normalize_whitespace(text)
    vision = _tag_content(normalized, "vision")
    if vision is not None and not vision[0].strip():
        vision = None  # an empty span is no span: the release finds no vision tokens in it
    span = None if vision is None else (source[vision[1]], source[vision[2] - 1] + 1)
    reasoning, analysis = _tag_content(normalized, "reasoning"), _tag_content(normalized, "analysis")
    boxed = boxed_span(normalized)
    vision_confidence = reasoning_confidence = confidence = raw_confidence = None
    if mode == "decoupled":
        vision_confidence, reasoning_confidence = _decoupled_scores(normalized)
    elif mode == "rlcr":
        single = _SINGLE_SCORE.search(normalized)
        if single is not None:
            raw_confidence = float(single.group(1))
            confidence = raw_confidence / 10.0 if raw_confidence <= 10.0 else None
    return ParsedResponse(
        mode=mode,
        text=normalized,
        vision=vision[0] if vision else None,
        reasoning=reasoning[0] if reasoning else None,
        answer=None if boxed is None else normalized[boxed[0]:boxed[1]].strip(),
        analysis=analysis[0] if analysis else None,
        vision_confidence=vision_confidence,
        reasoning_confidence=reasoning_confidence,
        confidence=confidence,
        raw_confidence=raw_confidence,
        format_ok=_format_ok(normalized, mode),
        vision_char_span=span,
        answer_char_end=None if boxed is None else source[boxed[1]] + 1,
    )
