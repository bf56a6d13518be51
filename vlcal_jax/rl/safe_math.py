"""A whitelisted, bounded parser and evaluator for the math in answers (used by `rl.grading`).

Model text is never handed to Python `eval` or to sympy. This module accepts only:
numbers (integers, decimals, scientific `1.5e3`), single-letter variables (`x`, `x_1`),
`+ - * / ^ **`, `\\times \\cdot \\div`, implicit multiplication (`2x`, `3\\pi`), parentheses
and braces, `\\frac{a}{b}` (also `\\frac12`), `\\sqrt{x}`, `\\sqrt[n]{x}`, `!`, `\\pi`,
`\\infty`, `\\sin \\cos \\tan \\ln \\log \\exp`, and the unicode forms of these symbols.
An integer written before a fraction of integers is a mixed number (`7\\frac{3}{4}`, `7 3/4`).

Values are exact `Fraction`s while only rational operations are involved and floats
afterwards. Every call is bounded without signals (so it also works in threads): input
length, nesting depth, integer sizes, magnitudes and factorial arguments are capped, and a
`Deadline` is checked at every parse and evaluation step. Anything outside the grammar or
a bound raises `MathError`.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from fractions import Fraction

MAX_CHARS = 2_000
MAX_DEPTH = 64
MAX_BITS = 4_096
MAX_MAGNITUDE = 1e300
MAX_FACTORIAL = 170
MAX_ROOT_INDEX = 64
_LIMIT_INT = 10**300
FUNCTIONS = ("sin", "cos", "tan", "ln", "log", "exp")
_CONSTANTS = {"pi": math.pi, "infty": math.inf, "inf": math.inf}
GREEK = ("alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "sigma", "phi", "varphi", "omega", "rho", "tau")
_OPERATOR_COMMANDS = {"times": "*", "cdot": "*", "div": "/"}
_COMMAND_ALIASES = {"dfrac": "frac", "tfrac": "frac"}
_SPACING_COMMANDS = {",", ";", ":", "!", " ", "quad", "qquad", "left", "right", "displaystyle"}
_UNICODE = {"π": "\\pi ", "√": "\\sqrt ", "×": "*", "÷": "/", "·": "*", "⋅": "*", "−": "-", "∞": "\\infty "}
_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<cmd>\\(?:[a-zA-Z]+|[,;:! ]))"
    r"|(?P<word>[a-zA-Z]+(?:_(?:\{[a-zA-Z0-9]{1,8}\}|[a-zA-Z0-9]))?)"
    r"|(?P<op>\*\*|[-+*/^!()\[\]{}])"
)


class MathError(ValueError):
    """The text is outside the whitelisted grammar or would exceed a size or time bound."""


class Deadline:
    """A wall-clock budget checked cooperatively (no signals, so it works in any thread)."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.expires:
            raise MathError("time budget exceeded")


def tokenize(text: str, deadline: Deadline) -> list[tuple[str, str, bool]]:
    """Splits `text` into (kind, value, preceded_by_space) tokens; kind in num/var/cmd/op."""
    if len(text) > MAX_CHARS:
        raise MathError(f"expression longer than {MAX_CHARS} characters")
    for symbol, replacement in _UNICODE.items():
        text = text.replace(symbol, replacement)
    tokens, pos, spaced = [], 0, False
    while pos < len(text):
        deadline.check()
        match = _TOKEN.match(text, pos)
        if match is None:
            raise MathError(f"character {text[pos]!r} is not in the grammar")
        pos = match.end()
        kind, value = match.lastgroup, match.group()
        if kind == "space":
            spaced = True
            continue
        if kind == "cmd":
            name = value[1:]
            if name in _SPACING_COMMANDS:
                spaced = True
                continue
            if name in _OPERATOR_COMMANDS:
                kind, value = "op", _OPERATOR_COMMANDS[name]
            else:
                value = _COMMAND_ALIASES.get(name, name)
        elif kind == "word":
            letters = value.split("_")[0]
            if len(letters) > 1:
                if value in FUNCTIONS or value in ("sqrt", "pi"):
                    kind = "cmd"
                else:
                    raise MathError(f"word {value!r} is text, not math")
            else:
                kind = "var"
        elif kind == "op" and value == "**":
            value = "^"
        tokens.append((kind, value, spaced))
        spaced = False
    return tokens


class _Parser:
    """Recursive descent over the token list; builds a tuple AST with n-ary sums and products."""

    def __init__(self, tokens, deadline: Deadline):
        self.tokens, self.pos, self.depth, self.deadline = tokens, 0, 0, deadline

    def peek(self, offset: int = 0):
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "", False)

    def take(self):
        token = self.peek()
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        kind, got, _ = self.take()
        if got != value or kind != "op":
            raise MathError(f"expected {value!r}, found {got!r}")

    def descend(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise MathError(f"nesting deeper than {MAX_DEPTH}")
        self.deadline.check()

    def parse(self):
        node = self.expression()
        if self.pos != len(self.tokens):
            raise MathError(f"unexpected {self.peek()[1]!r}")
        return node

    def expression(self):
        self.descend()
        terms = [(1, self.term())]
        while self.peek()[0] == "op" and self.peek()[1] in "+-":
            sign = 1 if self.take()[1] == "+" else -1
            terms.append((sign, self.term()))
        self.depth -= 1
        return terms[0][1] if len(terms) == 1 else ("sum", tuple(terms))

    def term(self):
        factors = [(1, self.unary())]
        while True:
            kind, value, _ = self.peek()
            if kind == "op" and value in "*/":
                self.take()
                factors.append((1 if value == "*" else -1, self.unary()))
            elif self._mixed_number_follows(factors):
                whole = factors.pop()[1]
                negative = whole[0] == "neg"
                if kind == "cmd":
                    self.take()
                    fraction = ("frac", self.group(), self.group())
                else:
                    numerator = self.number(self.take()[1])
                    self.take()
                    fraction = ("frac", numerator, self.number(self.take()[1]))
                mixed = ("sum", ((1, whole[1] if negative else whole), (1, fraction)))
                factors.append((1, ("neg", mixed) if negative else mixed))
            elif kind in ("var", "cmd") or (kind == "op" and value in "({"):
                factors.append((1, self.power()))
            else:
                break
        return factors[0][1] if len(factors) == 1 and factors[0][0] == 1 else ("prod", tuple(factors))

    def _mixed_number_follows(self, factors) -> bool:
        if len(factors) != 1:
            return False
        whole = factors[0][1]
        whole = whole[1] if whole[0] == "neg" else whole
        if whole[0] != "int":
            return False
        kind, value, spaced = self.peek()
        if kind == "cmd" and value == "frac":
            return self._frac_of_integers_at(self.pos + 1)
        return (
            kind == "num" and spaced and value.isdigit()
            and self.peek(1)[1] == "/" and self.peek(2)[0] == "num" and self.peek(2)[1].isdigit()
        )

    def _frac_of_integers_at(self, index: int) -> bool:
        window = [self.tokens[i][1] for i in range(index, min(index + 6, len(self.tokens)))]
        if window and len(window[0]) == 2 and window[0].isdigit():
            return True
        return len(window) == 6 and window[0] == "{" and window[1].isdigit() and window[2:4] == ["}", "{"] \
            and window[4].isdigit() and window[5] == "}"

    def unary(self):
        kind, value, _ = self.peek()
        if kind == "op" and value in "+-":
            self.take()
            self.descend()
            operand = self.unary()
            self.depth -= 1
            return ("neg", operand) if value == "-" else operand
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[:2] == ("op", "^"):
            self.take()
            self.descend()
            exponent = self.group() if self.peek()[:2] == ("op", "{") else self.unary()
            self.depth -= 1
            return ("pow", base, exponent)
        return base

    def postfix(self):
        node = self.primary()
        if self.peek()[:2] == ("op", "!"):
            self.take()
            if self.peek()[:2] == ("op", "!"):
                raise MathError("repeated factorial")
            node = ("fact", node)
        return node

    def primary(self):
        self.descend()
        node = self._primary()
        self.depth -= 1
        return node

    def _primary(self):
        kind, value, _ = self.take()
        if kind == "num":
            return self.number(value)
        if kind == "var":
            return ("var", value)
        if kind == "op" and value in "([{":
            self.descend()
            inner = self.expression()
            self.expect({"(": ")", "[": "]", "{": "}"}[value])
            self.depth -= 1
            return inner
        if kind == "cmd":
            if value in _CONSTANTS:
                return ("const", value)
            if value in GREEK:
                return ("var", value)
            if value == "frac":
                return ("frac", self.group(), self.group())
            if value == "sqrt":
                index = ("int", Fraction(2))
                if self.peek()[:2] == ("op", "["):
                    self.take()
                    index = self.expression()
                    self.expect("]")
                return ("root", self.group(), index)
            if value in FUNCTIONS:
                return ("func", value, self.group() if self.peek()[:2] == ("op", "{") else self.power())
        raise MathError(f"unexpected {value!r}" if kind != "end" else "expression ends too early")

    def number(self, text: str):
        mantissa, _, exponent = text.lower().partition("e")
        if len(mantissa) > 400 or (exponent and abs(int(exponent)) > 400):
            raise MathError("numeral with more than 400 digits")
        value = Fraction(text)
        return ("int", value) if text.isdigit() else ("num", value)

    def group(self):
        """A LaTeX argument: `{...}` or a single character/command (`\\frac12`, `\\sqrt3`)."""
        kind, value, spaced = self.peek()
        if kind == "op" and value == "{":
            self.take()
            self.descend()
            inner = self.expression()
            self.expect("}")
            self.depth -= 1
            return inner
        if kind == "num" and len(value) > 1:
            self.tokens[self.pos] = ("num", value[1:], False)
            return self.number(value[0]) if value[0] != "." else self.primary()
        return self.primary()


def parse(text: str, deadline: Deadline):
    """Parses `text` into an AST (nested tuples); raises `MathError` outside the grammar."""
    return _Parser(tokenize(text, deadline), deadline).parse()


def free_variables(node) -> frozenset[str]:
    """Variable names in an AST."""
    kind = node[0]
    if kind == "var":
        return frozenset([node[1]])
    if kind in ("sum", "prod"):
        children = [child for _, child in node[1]]
    elif kind in ("neg", "fact"):
        children = [node[1]]
    elif kind in ("frac", "pow", "root"):
        children = [node[1], node[2]]
    elif kind == "func":
        children = [node[2]]
    else:
        children = []
    found = frozenset()
    for child in children:
        found |= free_variables(child)
    return found


def variable_point(name: str, point: int) -> float:
    """A fixed pseudo-random value in [0.3, 2.3) for variable `name` at sample `point`."""
    return 0.3 + (zlib.crc32(f"{name}:{point}".encode()) % 100_000) / 50_000


def _checked(value):
    if isinstance(value, Fraction):
        if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
            raise MathError("number too large")
        if abs(value.numerator) > _LIMIT_INT * value.denominator:
            raise MathError(f"magnitude above {MAX_MAGNITUDE:g}")
        return value
    if math.isnan(value) or (math.isfinite(value) and abs(value) > MAX_MAGNITUDE):
        raise MathError("result is nan or too large")
    return value


def _as_float(value) -> float:
    return float(value) if isinstance(value, Fraction) else value


def _power(base, exponent):
    if isinstance(exponent, Fraction) and exponent.denominator == 1 and isinstance(base, Fraction):
        n = exponent.numerator
        if base == 0 and n < 0:
            raise MathError("zero to a negative power")
        if base in (0, 1) or n == 0:
            return Fraction(1) if n == 0 else base
        if base == -1:
            return Fraction(-1 if n % 2 else 1)
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if abs(n) * max(size - 1, 1) > MAX_BITS:
            raise MathError("power too large")
        return _checked(base**n)
    b, e = _as_float(base), _as_float(exponent)
    if b < 0 and not float(e).is_integer():
        raise MathError("negative base with a fractional exponent")
    if b == 0 and e < 0:
        raise MathError("zero to a negative power")
    try:
        return _checked(math.pow(b, e))
    except OverflowError as error:
        raise MathError("power too large") from error


def _root(value, index):
    if not (isinstance(index, Fraction) and index.denominator == 1 and 1 <= index <= MAX_ROOT_INDEX):
        raise MathError("root index must be an integer in 1..64")
    k = int(index)
    if value < 0:
        if k % 2 == 0:
            raise MathError("even root of a negative number")
        return -_root(-value, index)
    if isinstance(value, Fraction):
        num, den = _integer_root(value.numerator, k), _integer_root(value.denominator, k)
        if num is not None and den is not None:
            return Fraction(num, den)
    return _checked(_as_float(value) ** (1.0 / k))


def _integer_root(n: int, k: int) -> int | None:
    try:
        guess = math.isqrt(n) if k == 2 else round(float(n) ** (1.0 / k))
    except OverflowError:
        return None
    for candidate in (guess - 1, guess, guess + 1):
        if candidate >= 0 and candidate**k == n:
            return candidate
    return None


def _function(name: str, x: float) -> float:
    if name in ("ln", "log"):
        if x <= 0:
            raise MathError("logarithm of a non-positive number")
        return math.log(x)
    if name == "exp":
        if x > 690:
            raise MathError("exp argument too large")
        return math.exp(x)
    if not math.isfinite(x) or abs(x) > 1e6:
        raise MathError("trigonometric argument out of range")
    return {"sin": math.sin, "cos": math.cos, "tan": math.tan}[name](x)


def evaluate(node, env: dict[str, float], deadline: Deadline):
    """Value of an AST: a `Fraction` if exact, else a float. Raises `MathError` on any bound."""
    deadline.check()
    kind = node[0]
    if kind in ("int", "num"):
        return node[1]
    if kind == "var":
        if node[1] not in env:
            raise MathError(f"unbound variable {node[1]!r}")
        return env[node[1]]
    if kind == "const":
        return _CONSTANTS[node[1]]
    if kind == "neg":
        return -evaluate(node[1], env, deadline)
    if kind == "sum":
        total = Fraction(0)
        for sign, term in node[1]:
            value = evaluate(term, env, deadline)
            total = _checked(total + value if sign > 0 else total - value)
        return total
    if kind in ("prod", "frac"):
        factors = node[1] if kind == "prod" else ((1, node[1]), (-1, node[2]))
        product = Fraction(1)
        for op, factor in factors:
            value = evaluate(factor, env, deadline)
            if op < 0 and value == 0:
                raise MathError("division by zero")
            product = _checked(product * value if op > 0 else product / value)
        return product
    if kind == "pow":
        return _power(evaluate(node[1], env, deadline), evaluate(node[2], env, deadline))
    if kind == "fact":
        value = evaluate(node[1], env, deadline)
        if not (isinstance(value, Fraction) and value.denominator == 1 and 0 <= value <= MAX_FACTORIAL):
            raise MathError(f"factorial needs an integer in 0..{MAX_FACTORIAL}")
        return Fraction(math.factorial(int(value)))
    if kind == "root":
        return _root(evaluate(node[1], env, deadline), evaluate(node[2], env, deadline))
    if kind == "func":
        return _checked(_function(node[1], _as_float(evaluate(node[2], env, deadline))))
    raise MathError(f"unknown node {kind!r}")


def values_equal(a, b) -> bool:
    """Exact equality for two `Fraction`s; otherwise equal up to float rounding (rel/abs 1e-12)."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    fa, fb = _as_float(a), _as_float(b)
    if math.isinf(fa) or math.isinf(fb):
        return fa == fb
    return math.isclose(fa, fb, rel_tol=1e-12, abs_tol=1e-12)


def expressions_equal(left, right, deadline: Deadline, n_points: int = 3) -> bool:
    """Whether two ASTs have equal values; with variables, equal at `n_points` fixed random points."""
    names = free_variables(left) | free_variables(right)
    if not names:
        return values_equal(evaluate(left, {}, deadline), evaluate(right, {}, deadline))
    for point in range(n_points):
        env = {name: variable_point(name, point) for name in names}
        if not values_equal(evaluate(left, env, deadline), evaluate(right, env, deadline)):
            return False
    return True
