"""Answer extraction and grading: the indicator I of PAPER.md section 3.

`extract_boxed` returns the content of the last `\\boxed{}` / `\\fbox{}` (braces matched).
`grade_answer(pred, gold, choices=None)` decides whether a predicted answer equals the gold
one. It handles integers, decimals, thousands separators, percentages, scientific
notation, `\\frac`/`\\dfrac`/`a/b`, `\\sqrt`, `\\pi`, degrees, `\\text{}` and units, multiple
choice, tuples, intervals, sets, yes/no and other short text.

Model text is never executed: symbolic equality goes through the whitelisted parser of
`rl.safe_math` (no `eval`, no sympy). Every call is bounded to `timeout_s` (default 1 s)
by a cooperative deadline plus caps on length, nesting and number sizes, so it is safe in
threads; anything over a bound grades False.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction

from vlcal_jax.rl import safe_math
from vlcal_jax.rl.safe_math import Deadline, MathError

MAX_ANSWER_CHARS = 10_000
MAX_ELEMENTS = 32
_BOX_OPENERS = ("\\boxed", "\\fbox")
_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|textnormal|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}"
)
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])")
_SPACING = re.compile(r"\\(?:[,;:! ]|quad|qquad|displaystyle)(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![a-zA-Z])")
_EQUATION_LHS = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]{1,4}\}?)?\s*=\s*(?=\S)")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:,|\{,\}|\\,| )\d{3})+(?:\.\d+)?$")
_UNITS = (
    "mm cm dm m km in inch inches ft foot feet yd yard yards mi mile miles "
    "millimeter millimeters centimeter centimeters meter meters metre metres kilometer kilometers "
    "g kg mg gram grams kilogram kilograms lb lbs pound pounds oz ounce ounces ton tons "
    "s sec secs second seconds min mins minute minutes h hr hrs hour hours day days week weeks "
    "month months year years ml l liter liters litre litres "
    "degree degrees deg rad radian radians unit units sq square cubic dollar dollars cent cents "
    "yuan euro euros people person persons students times point points"
).split()
_UNIT_TAIL = re.compile(
    r"(?:" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")(?:\s*\^\s*\{?[23]\}?|[23²³])?\s*$", re.IGNORECASE
)
_MAX_UNIT_WORDS = 6
_CONJUNCTION = re.compile(r"\s+(?:or|and)\s+")
_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
_MARKDOWN_BOLD = re.compile(r"^\*\*(.+)\*\*$")
_LETTER_PHRASE = re.compile(r"^(?:the\s+)?(?:option|choice|answer)\s*(?:is\s*)?:?\s*\(?([A-Za-z])\)?(?:[.:)]|\s|$)", re.I)
_LETTER_THEN_TEXT = re.compile(r"^(?:\(([A-Za-z])\)|([A-Z])[.:)])\s*\S")
_CHOICE_PREFIX = re.compile(r"^\s*\(?([A-Za-z])\)?[.:)]\s*")


def boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the LAST `\\boxed{...}` or `\\fbox{...}` in `text`, braces
    matched: text[start:end] is the content and text[end] its closing brace; None if absent or unclosed."""
    if not text:
        return None
    start = -1
    for opener in _BOX_OPENERS:
        position = text.rfind(opener + "{")
        spaced = text.rfind(opener + " {")
        start = max(start, position + len(opener) + 1 if position >= 0 else -1,
                    spaced + len(opener) + 2 if spaced >= 0 else -1)
    if start < 0:
        return None
    depth = 1
    for index in range(start, len(text)):
        char = text[index]
        if char == "{" and text[index - 1] != "\\":
            depth += 1
        elif char == "}" and text[index - 1] != "\\":
            depth -= 1
            if depth == 0:
                return start, index
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` or `\\fbox{...}` in `text`, braces matched; None if absent or unclosed."""
    span = boxed_span(text)
    return None if span is None else text[span[0]:span[1]].strip()


def normalize_answer(text: str) -> str:
    """Canonical surface form: no `$`, sizing/spacing commands, `\\text{}` wrappers, degrees or final period."""
    text = text.strip()
    if any(opener in text for opener in _BOX_OPENERS):
        boxed = extract_boxed(text)
        text = boxed if boxed is not None else text
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "%")
    text = _SIZING.sub("", text)
    text = _SPACING.sub(" ", text)
    for _ in range(4):
        unwrapped = _TEXT_COMMANDS.sub(r" \1 ", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _DEGREES.sub("", text)
    text = " ".join(text.split())
    bold = _MARKDOWN_BOLD.match(text)
    text = bold.group(1) if bold else text
    return text.rstrip(".。").strip()


def _split_top_level(text: str) -> list[str]:
    """Splits at commas not inside any bracket."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts]


def _sequence(text: str):
    """(opening, closing, elements) for a tuple, interval, set or comma list; None for a single value."""
    if _THOUSANDS.match(text):
        return None
    if text.startswith("\\{") and text.endswith("\\}"):
        return "{", "}", _split_top_level(text[2:-2])
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]":
        depth = 0
        for index, char in enumerate(text):
            depth += char in "([{"
            depth -= char in ")]}"
            if depth == 0 and index < len(text) - 1:
                break
        else:
            elements = _split_top_level(text[1:-1])
            if len(elements) > 1:
                return text[0], text[-1], elements
    elements = _split_top_level(text)
    if len(elements) == 1:
        elements = [part.strip() for part in _CONJUNCTION.split(text)]
    return ("", "", elements) if len(elements) > 1 else None


def _strip_units(text: str) -> str:
    """`text` without trailing unit words (`5 cm`, `3 m/s`, `12 square units`); unchanged if nothing is left."""
    end = len(text.rstrip())
    for _ in range(_MAX_UNIT_WORDS):
        # Search a short window only, so the cost stays linear however long `text` is.
        match = _UNIT_TAIL.search(text, max(0, end - 24), end)
        if match is None or (match.start() > 0 and text[match.start() - 1].isalpha()):
            break
        end = len(text[: match.start()].rstrip().rstrip("/").rstrip())
    stripped = text[:end].strip()
    return stripped if stripped else text


def _values(text: str, deadline: Deadline) -> list:
    """ASTs for `text` as written and without trailing units; empty when it is not math."""
    text = text.strip()
    if _THOUSANDS.match(text):
        return [("num", Fraction(re.sub(r"\{,\}|\\,|[, ]", "", text)))]
    nodes = []
    for candidate in dict.fromkeys((text, _strip_units(text))):
        try:
            nodes.append(safe_math.parse(candidate, deadline))
        except MathError:
            deadline.check()
    return nodes


def _scalar_equal(pred: str, gold: str, deadline: Deadline) -> bool:
    if pred.casefold().replace(" ", "") == gold.casefold().replace(" ", ""):
        return True
    if gold.count("=") == 1 and pred.count("=") == 1:
        pred_lhs, gold_lhs = pred.split("=")[0].strip(), gold.split("=")[0].strip()
        if pred_lhs.replace(" ", "") == gold_lhs.replace(" ", ""):
            pred, gold = pred.split("=")[1], gold.split("=")[1]
    pred, gold = _EQUATION_LHS.sub("", pred, count=1), _EQUATION_LHS.sub("", gold, count=1)
    pred_percent, gold_percent = pred.rstrip().endswith("%"), gold.rstrip().endswith("%")
    pred, gold = pred.rstrip().rstrip("%"), gold.rstrip().rstrip("%")
    pred_nodes, gold_nodes = _values(pred, deadline), _values(gold, deadline)
    if not pred_nodes or not gold_nodes:
        return _strip_units(pred).casefold().replace(" ", "") == _strip_units(gold).casefold().replace(" ", "")
    hundred = ("int", Fraction(100))
    for pred_node in pred_nodes:
        for gold_node in gold_nodes:
            pairs = [(pred_node, gold_node)]
            if gold_percent and not pred_percent:
                pairs.append((pred_node, ("frac", gold_node, hundred)))
            if pred_percent and not gold_percent:
                pairs.append((("frac", pred_node, hundred), gold_node))
            if any(_nodes_equal(p, g, deadline) for p, g in pairs):
                return True
    return False


def _nodes_equal(pred_node, gold_node, deadline: Deadline) -> bool:
    try:
        return safe_math.expressions_equal(pred_node, gold_node, deadline)
    except MathError:
        deadline.check()
        return False


def _answers_equal(pred: str, gold: str, deadline: Deadline) -> bool:
    pred_seq, gold_seq = _sequence(pred), _sequence(gold)
    if pred_seq is None and gold_seq is None:
        return _scalar_equal(pred, gold, deadline)
    if pred_seq is None or gold_seq is None:
        return False
    (pred_open, pred_close, pred_items), (gold_open, gold_close, gold_items) = pred_seq, gold_seq
    if (pred_open, pred_close) != (gold_open, gold_close) or len(pred_items) != len(gold_items):
        return False
    if len(gold_items) > MAX_ELEMENTS:
        return False
    if gold_open in ("(", "["):
        return all(_scalar_equal(p, g, deadline) for p, g in zip(pred_items, gold_items))
    # Sets and bare comma lists (e.g. all solutions of an equation) are unordered.
    remaining = list(pred_items)
    for gold_item in gold_items:
        match = next((i for i, p in enumerate(remaining) if _scalar_equal(p, gold_item, deadline)), None)
        if match is None:
            return False
        remaining.pop(match)
    return True


def _choice_texts(choices) -> dict[str, str]:
    """Letter -> normalized choice text, from a list (A, B, ... in order) or a mapping."""
    if isinstance(choices, Mapping):
        items = [(str(k).strip().strip("()").upper(), str(v)) for k, v in choices.items()]
    elif isinstance(choices, Sequence) and not isinstance(choices, str):
        items = [(chr(ord("A") + i), str(v)) for i, v in enumerate(choices)]
    else:
        raise TypeError(f"choices must be a list of option texts or a letter->text mapping, got {type(choices).__name__}")
    texts = {}
    for letter, text in items:
        prefix = _CHOICE_PREFIX.match(text)
        if prefix and prefix.group(1).upper() == letter:
            text = text[prefix.end():]
        texts[letter] = normalize_answer(text)
    return texts


def _letter(text: str) -> str | None:
    for pattern in (_LETTER, _LETTER_PHRASE, _LETTER_THEN_TEXT):
        match = pattern.match(text)
        if match:
            return next(group for group in match.groups() if group).upper()
    return None


def _letter_of_text(text: str, texts: dict[str, str], deadline: Deadline) -> str | None:
    matches = [letter for letter, option in texts.items() if option and _answers_equal(text, option, deadline)]
    return matches[0] if len(matches) == 1 else None


def _grade_choice(pred: str, gold: str, texts: dict[str, str], deadline: Deadline) -> bool | None:
    """Multiple-choice verdict, or None when `gold` is not a choice; `texts` from `_choice_texts` ({} if none)."""
    gold_letter = _LETTER.match(gold)
    gold_letter = gold_letter.group(1) if gold_letter else None
    if gold_letter is not None and not (gold_letter.isupper() or gold_letter.upper() in texts):
        gold_letter = None
    if gold_letter is None and texts:
        gold_letter = _letter_of_text(gold, texts, deadline)
    if gold_letter is None:
        return None
    gold_letter = gold_letter.upper()
    pred_letter = _letter(pred)
    if pred_letter is None and texts:
        pred_letter = _letter_of_text(pred, texts, deadline)
    if pred_letter is None and gold_letter in texts and texts[gold_letter]:
        return _answers_equal(pred, texts[gold_letter], deadline)
    return pred_letter == gold_letter


def grade_answer(pred: str | None, gold: str, choices=None, *, timeout_s: float = 1.0) -> bool:
    """Whether the predicted answer `pred` equals `gold`; I of PAPER.md section 3.

    `pred` is the extracted answer (a full `\\boxed{}` response also works). `choices`, when
    given, lists the options of a multiple-choice question (list in A, B, ... order or a
    letter -> text mapping); `pred` may then be a letter ("B", "(B)", "B.", "Option B") or the
    text of an option, and `gold` a letter or an option text. Never raises on model text:
    unparseable, oversized (> 10,000 characters) or over-budget input grades False.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    deadline = Deadline(timeout_s)
    texts = _choice_texts(choices) if choices is not None else {}
    try:
        pred, gold = normalize_answer(pred), normalize_answer(gold)
        if not pred or not gold:
            return False
        if pred == gold:
            return True
        verdict = _grade_choice(pred, gold, texts, deadline)
        if verdict is not None:
            return verdict
        return _answers_equal(pred, gold, deadline)
    except (MathError, RecursionError, ValueError, ArithmeticError):
        # Model text must never take a training step down: anything unparseable is simply wrong.
        return False
