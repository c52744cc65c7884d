"""A safe parser for answer strings: a LaTeX / plain-text math subset -> sympy objects.

Model output is hostile input. Nothing here evaluates Python: no eval/exec/sympify/parse_expr/parse_latex.
Strings are cleaned with regexes, split by our own tokenizer, and a recursive-descent parser builds sympy
objects directly (Integer, Rational, Symbol, Add, Mul, Pow, functions from an explicit table). Guards:
input length, nesting depth, token count, and the size of every power / factorial / binomial before sympy
is asked to build it (``9^{9^{9^9}}`` is refused, not computed).

The parser returns one of these values:
  sympy.Expr                a scalar (numbers are exact: 0.5 -> 1/2, 0.\\overline{3} -> 1/3)
  Seq(kind, items, open, close)  kind: 'tuple' ((1,2), [0,1), intervals), 'set' (\\{1,2\\}), 'list' (1, 2)
  Mat(rows)                 a matrix (pmatrix/bmatrix/array)
  Rel(parts, ops, simple_lhs)    an equation or (chained) inequality, e.g. x = 5, 1 < x \\le 3
  Union(items)              A \\cup B
  SetConst(name)            \\mathbb{R}, \\emptyset
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import sympy

from reward.extraction import match_brace

MAX_CHARS = 1000          # answer strings longer than this never match
MAX_TOKENS = 400
MAX_DEPTH = 250           # parser recursion budget (about 50 levels of brackets)
MAX_POW_BITS = 20_000     # refuse a numeric power whose result would need more bits than this
MAX_FACTORIAL = 2_000
MAX_BINOM = 5_000
MAX_EXPONENT = 10_000     # refuse |integer exponent| above this unless the base is 0, 1 or -1 or symbolic


class ParseError(Exception):
    pass


class TooBig(ParseError):
    pass


PM = sympy.Symbol("PLUSMINUS_", real=True)   # placeholder for \pm: expanded to +1 and -1 after parsing
DEG = sympy.Symbol("DEGREE_", positive=True)     # placeholder for a degree mark: compared both as 1 and as pi/180


@dataclass
class Seq:
    kind: str                 # 'tuple' | 'set' | 'list'
    items: list
    open: str = ""
    close: str = ""


@dataclass
class Mat:
    rows: list


@dataclass
class Rel:
    parts: list
    ops: list                 # '=', '<', '>', '<=', '>=', '!=', 'in'
    simple_lhs: bool = False  # the left side is a bare variable / f(x): 'x = 5' means '5'


@dataclass
class Union:
    items: list


@dataclass
class SetDiff:
    left: object
    right: object


@dataclass
class SetConst:
    name: str                 # 'R' | 'empty'


@dataclass
class Flags:
    percent: bool = False
    degree: bool = False
    text_like: bool = False
    units: tuple = ()         # unit words stripped after a number, canonical ('inch',), ('dollar',)


# ----------------------------------------------------------------------------------------------------------
# Clean-up


_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": r"\times ", "\u00f7": r"\div ", "\u00b7": r"\cdot ",
    "\u22c5": r"\cdot ", "\u221a": r"\sqrt ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u2264": r"\le ",
    "\u2265": r"\ge ", "\u2260": r"\ne ", "\u222a": r"\cup ", "\u2229": r"\cap ", "\u00b0": r"^\circ ",
    "\u2205": r"\emptyset ", "\u211d": r"\mathbb{R}", "\u00bd": "(1/2)", "\u00bc": "(1/4)", "\u00be": "(3/4)",
    "\u200b": "", "\ufeff": "", "\u2060": "", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " ", "\u2032": "'", "\u00b2": "^2", "\u00b3": "^3",
    "\u2248": r"\approx ", "\u00b1": r"\pm ", "\u2213": r"\mp ", "\u2208": r"\in ", "\uff0c": ",",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))

_TEXT_CMDS = ("boxed", "fbox", "text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "mathrm", "mathbf", "mathit",
              "mathsf", "mathtt", "mbox", "hbox", "operatorname", "emph", "boldsymbol", "bm", "mathnormal", "rm",
              "bf", "it", "textup", "textmd", "mathbfit", "pmb")
_TEXT_CMD_RE = re.compile(r"\\(?:%s)\s*\{" % "|".join(_TEXT_CMDS))
_DROP_WITH_ARG_RE = re.compile(r"\\(?:hspace|vspace|phantom|hphantom|vphantom|label|tag)\*?\s*\{[^{}]*\}")

_SIMPLE_SUBS = [
    (re.compile(r"\\(?:d|t|c)frac"), r"\\frac"),
    (re.compile(r"\\(?:d|t)binom"), r"\\binom"),
    (re.compile(r"\\left\s*\.|\\right\s*\."), ""),
    (re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|bigm|Bigm|big|Big|bigg|Bigg)(?![a-zA-Z])"), ""),
    (re.compile(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits|mathstrut|strut|middle)(?![a-zA-Z])"), ""),
    (re.compile(r"\\(?:q?quad|enspace|thinspace|medspace|thickspace|negthinspace)(?![a-zA-Z])"), " "),
    (re.compile(r"\\[,;:!>]"), ""),
    (re.compile(r"\\ "), " "),
    (re.compile(r"~"), " "),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|\^\s*\{\s*o\s*\}(?![a-zA-Z])"), "\x01"),  # degree mark
    (re.compile(r"\\%|%|\\percent"), "\x02"),                                                       # percent mark
    (re.compile(r"\\textdollar(?![a-zA-Z])|\\\$|\$"), ""),
    (re.compile(r"\\(?:angle|measuredangle|triangle)(?![a-zA-Z])\s*"), ""),
    (re.compile(r"\\lbrace(?![a-zA-Z])"), r"\\{"),
    (re.compile(r"\\rbrace(?![a-zA-Z])"), r"\\}"),
    (re.compile(r"\\langle(?![a-zA-Z])"), "("),
    (re.compile(r"\\rangle(?![a-zA-Z])"), ")"),
    (re.compile(r"\\(?:lvert|rvert|vert|mid)(?![a-zA-Z])|\\\||\\lVert|\\rVert|\\Vert"), "|"),
    (re.compile(r"\\(?:leqslant|leq|le)(?![a-zA-Z])"), r"\\le "),
    (re.compile(r"\\(?:geqslant|geq|ge)(?![a-zA-Z])"), r"\\ge "),
    (re.compile(r"\\(?:neq|ne)(?![a-zA-Z])"), r"\\ne "),
    (re.compile(r"\\lt(?![a-zA-Z])"), "<"),
    (re.compile(r"\\gt(?![a-zA-Z])"), ">"),
    (re.compile(r"<="), r"\\le "),
    (re.compile(r">="), r"\\ge "),
    (re.compile(r"!="), r"\\ne "),
    (re.compile(r"\\infin(?![a-zA-Z])"), r"\\infty "),
    (re.compile(r"\\varnothing(?![a-zA-Z])"), r"\\emptyset "),
    (re.compile(r"\\(?:dots|ldots|cdots)(?![a-zA-Z])"), r"\\dots "),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\mathbb\s*\{\s*R\s*\}|\\R(?![a-zA-Z])|\\Reals(?![a-zA-Z])|\\reals(?![a-zA-Z])"), r"\\REALS "),
]

_PHRASES = [
    (re.compile(r"^(?:the\s+set\s+of\s+)?all\s+real\s+numbers$|^all\s+reals$|^\(\s*-\s*\\infty\s*,\s*\\infty\s*\)$",
                re.I), r"\\REALS"),
    (re.compile(r"^(?:there\s+(?:is|are)\s+)?no\s+(?:real\s+)?(?:solutions?|roots?)$|^the\s+empty\s+set$", re.I),
     r"\\emptyset"),
]

_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d])(?!,\d)")
_SPACE_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$")


def _unwrap_text(s: str) -> str:
    """\\text{abc} -> ' abc ' (nested braces respected)."""
    for _ in range(50):
        m = _TEXT_CMD_RE.search(s)
        if not m:
            break
        j = m.end() - 1
        k = match_brace(s, j)
        k = len(s) if k < 0 else k
        if k >= len(s):
            s = s[:m.start()] + " " + s[m.end():]
            continue
        s = s[:m.start()] + " " + s[j + 1:k] + " " + s[k + 1:]
    return s


def clean(s: str) -> tuple[str, Flags]:
    """LaTeX clean-up: delimiters, spacing, \\left/\\right, \\dfrac, \\text{}, degrees, percent, separators."""
    flags = Flags()
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = s.replace("\x03", "").replace("\\\\", "\x03")  # protect \\ (matrix rows) from the spacing rules
    s = s.strip()
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).strip()
    s = _DROP_WITH_ARG_RE.sub("", s)
    s = re.sub(r"(\d),\s*\\!\s*(?=\d{3}(?!\d))", r"\1,", s)  # 11,\! 111 (MATH's thousands separator)
    s = _unwrap_text(s)
    for rx, rep in _SIMPLE_SUBS:
        s = rx.sub(rep, s)
    if "\x01" in s:
        flags.degree = True
        s = s.replace("\x01", " \\DEG ")
    s = s.replace("\x03", " \\\\ ")
    if "\x02" in s:
        flags.percent = True
        s = s.replace("\x02", " ")
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    for rx, rep in _PHRASES:
        s = rx.sub(rep, s)
    # thousands separators: 1,000,000 -> 1000000 (not inside a bracketed tuple/set/interval)
    if not re.match(r"^(?:\(|\[|\\\{)", s):
        s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
        if _SPACE_THOUSANDS_RE.match(s):
            s = s.replace(" ", "")
    return s, flags


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


_TOKEN_RE = re.compile(r"""
   (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:\\overline\s*\{\s*\d+\s*\}|\\overline\s*\d)?(?:[eE][-+]?\d+(?![a-zA-Z.]))?)
  |(?P<begin>\\begin\s*\{\s*(?P<benv>[a-zA-Z]+\*?)\s*\})
  |(?P<end>\\end\s*\{\s*[a-zA-Z]+\*?\s*\})
  |(?P<rowsep>\\\\)
  |(?P<cmd>\\[a-zA-Z]+|\\[{}])
  |(?P<word>[a-zA-Z]+)
  |(?P<op>[-+*/^_()\[\]{},=<>!|&;:'])
  |(?P<ws>\s+)
""", re.VERBOSE)

FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "arccot": sympy.acot,
    "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "coth": sympy.coth,
    "exp": sympy.exp, "ln": sympy.log, "log": sympy.log, "lg": None, "abs": sympy.Abs,
    "floor": sympy.floor, "ceil": sympy.ceiling,
}
INVERSE = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan, "cot": sympy.acot, "sinh": sympy.asinh,
           "cosh": sympy.acosh, "tanh": sympy.atanh}
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
         "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
         "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
PLAIN_WORDS = {"sqrt": "sqrt", "pi": "pi", "inf": "infty", "infinity": "infty", "infty": "infty"}
SEP_WORDS = {"or", "and"}
UNIT_WORDS = {
    "m", "cm", "mm", "km", "in", "inch", "inches", "ft", "feet", "foot", "yd", "yard", "yards", "mi", "mile", "miles",
    "meter", "meters", "metre", "metres", "centimeter", "centimeters", "kilometer", "kilometers", "millimeters",
    "g", "kg", "mg", "gram", "grams", "kilogram", "kilograms", "lb", "lbs", "pound", "pounds", "oz", "ounce",
    "ounces", "ton", "tons", "s", "sec", "secs", "second", "seconds", "min", "mins", "minute", "minutes", "h", "hr",
    "hrs", "hour", "hours", "day", "days", "week", "weeks", "month", "months", "year", "years", "l", "L", "ml", "mL",
    "liter", "liters", "litre", "litres", "gallon", "gallons", "cup", "cups", "dollar", "dollars", "cent", "cents",
    "usd", "USD", "euro", "euros", "degree", "degrees", "deg", "radian", "radians", "rad", "unit", "units", "sq",
    "square", "cubic", "mph", "kph", "kmh", "percent", "per", "kmph", "mps", "pt", "pts", "points", "point",
    "C", "F", "K", "celsius", "fahrenheit", "kelvin",
}
MULTIPLIERS = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9, "trillion": 10 ** 12}
TEXT_SHORT = {"yes", "no", "odd", "all", "not", "nor", "any", "one", "two", "six", "ten", "and", "or", "the",
              "none", "true", "false", "even", "both", "neither"}


@dataclass
class Tok:
    kind: str     # num, begin, end, rowsep, cmd, word, op, sep
    text: str
    space_before: bool = False
    env: str = ""


def tokenize(s: str) -> list[Tok]:
    toks: list[Tok] = []
    pos, space = 0, False
    n = len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise ParseError(f"unexpected character {s[pos]!r}")
        kind = m.lastgroup
        text = m.group(0)
        pos = m.end()
        if kind == "ws":
            space = True
            continue
        if kind == "benv":
            kind = "begin"
        if kind == "begin":
            env = m.group("benv")
            if env.rstrip("*") == "array":  # column spec
                mm = re.match(r"\s*\{[^{}]*\}", s[pos:])
                if mm:
                    pos += mm.end()
            toks.append(Tok("begin", text, space, env.rstrip("*")))
        elif kind == "word":
            low = text
            if low in SEP_WORDS:
                toks.append(Tok("sep", ",", space))
            elif low in PLAIN_WORDS:
                toks.append(Tok("cmd", "\\" + PLAIN_WORDS[low], space))
            elif low in FUNCS:
                toks.append(Tok("cmd", "\\" + low, space))
            else:
                toks.append(Tok("word", text, space))
        else:
            toks.append(Tok(kind, text, space))
        space = False
        if len(toks) > MAX_TOKENS:
            raise ParseError("too many tokens")
    return toks


def _is_numeric_prefix(toks: list[Tok]) -> bool:
    """Tokens that make a number-like expression (no letters): 12, 3.5, \\frac{1}{2}, 2\\sqrt{3}, 4\\pi."""
    if not toks:
        return False
    ok_cmds = {"\\frac", "\\sqrt", "\\pi", "\\cdot", "\\times", "\\div", "\\DEG"}
    has_num = False
    for t in toks:
        if t.kind == "num":
            has_num = True
        elif t.kind == "op" and t.text in "+-*/^(){}.":
            pass
        elif t.kind == "cmd" and t.text in ok_cmds:
            pass
        else:
            return False
    return has_num


def strip_units(toks: list[Tok]) -> list[Tok]:
    """Drop a trailing unit phrase after a number: '5 cm', '12 apples', '3 m^2', '40 km/h', '7 sq ft'."""
    if not toks or toks[-1].kind not in ("word", "num"):
        return toks
    i = len(toks)
    saw_word = False
    while i > 0:
        t = toks[i - 1]
        if t.kind == "word":
            saw_word = True
            i -= 1
        elif t.kind == "num" and i >= 2 and toks[i - 2].text == "^" and i - 2 > 0 and toks[i - 3].kind == "word":
            i -= 2
        elif t.kind == "op" and t.text in "/^." and i >= 2 and toks[i - 2].kind == "word" and saw_word:
            i -= 1
        else:
            break
    if not saw_word or i == 0:
        return toks
    unit = toks[i:]
    prefix = toks[:i]
    if not _is_numeric_prefix(prefix):
        return toks
    if unit[0].kind == "word" and unit[0].text.lower() in MULTIPLIERS:  # 1.5 million -> 1.5 * 1000000
        mult = [Tok("op", "*"), Tok("num", str(MULTIPLIERS[unit[0].text.lower()]))]
        rest = strip_units(prefix + [Tok("num", "1", True)] + unit[1:]) if len(unit) > 1 else None
        if rest is not None and rest[-1].text != "1":
            return toks
        return [Tok("op", "(")] + prefix + [Tok("op", ")")] + mult
    words = [t.text for t in unit if t.kind == "word"]
    for w in words:
        if w in UNIT_WORDS or w.lower() in UNIT_WORDS:
            continue
        if len(w) >= 3 and w.isalpha():
            continue
        return toks
    # a single-letter unit glued to the number ('5m') is ambiguous with a variable: require a space
    if len(words) == 1 and len(words[0]) == 1 and not unit[0].space_before:
        return toks
    return prefix


_UNIT_CANON = {"in": "inch", "inches": "inch", "ft": "foot", "feet": "foot", "yd": "yard", "mi": "mile",
               "m": "meter", "metre": "meter", "cm": "centimeter", "mm": "millimeter", "km": "kilometer",
               "g": "gram", "kg": "kilogram", "mg": "milligram", "lb": "pound", "lbs": "pound", "oz": "ounce",
               "s": "second", "sec": "second", "secs": "second", "min": "minute", "mins": "minute", "h": "hour",
               "hr": "hour", "hrs": "hour", "l": "liter", "litre": "liter", "ml": "milliliter",
               "usd": "dollar", "deg": "degree", "rad": "radian", "pt": "point", "pts": "point", "kph": "kmh",
               "kmph": "kmh"}
_UNIT_IGNORE = {"sq", "square", "cubic", "per", "of", "and"}


def canonical_units(unit_toks: list[Tok]) -> tuple:
    """('5 sq ft' -> ('foot',)): unit words, singular and canonical, without square/cubic/powers."""
    out = []
    for t in unit_toks:
        if t.kind != "word":
            continue
        w = t.text.lower()
        if w in _UNIT_IGNORE:
            continue
        w = _UNIT_CANON.get(w, w)
        if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
            w = w[:-1]
        w = _UNIT_CANON.get(w, w)
        out.append(w)
    return tuple(out)


def text_form(s: str) -> str:
    """Normalised text for comparing word answers: lowercase, no punctuation or articles, single spaces."""
    s = s.lower()
    s = re.sub(r"\\[a-z]+", " ", s)
    s = re.sub(r"[{}()\[\].,;:!?\"'`*]", " ", s)
    s = re.sub(r"\b(?:the|a|an)\b", " ", s)
    s = re.sub(r"\b(\w{3,}?)s\b", r"\1", s)  # plural: 'no solutions' ~ 'no solution'
    return re.sub(r"\s+", " ", s).strip()


def is_text_like(toks: list[Tok]) -> bool:
    for t in toks:
        if t.kind == "word" and (len(t.text) >= 4 or t.text.lower() in TEXT_SHORT):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Guarded constructors


def _bits(x: sympy.Rational) -> float:
    return max(abs(int(x.p)).bit_length(), int(x.q).bit_length())


def safe_pow(base, exp):
    if not isinstance(base, sympy.Basic) or not isinstance(exp, sympy.Basic):
        raise ParseError("power of a non-scalar")
    if base.has(sympy.zoo, sympy.nan) or exp.has(sympy.zoo, sympy.nan):
        raise ParseError("undefined")
    if base.has(sympy.oo, -sympy.oo) or exp.has(sympy.oo, -sympy.oo):
        raise ParseError("power with infinity")
    if base == 0 and not exp.is_number:
        raise ParseError("0 to a symbolic power")
    if exp.is_Rational:
        if base in (sympy.S.Zero, sympy.S.One, sympy.S.NegativeOne):
            if base == 0 and exp.is_negative:
                raise ParseError("division by zero")
            return sympy.Pow(base, exp)
        if base.is_Rational:
            if int(exp.q) > 1000:
                raise TooBig("exponent denominator too large")
            if abs(float(exp)) * _bits(base) > MAX_POW_BITS:
                raise TooBig("power too large")
            return sympy.Pow(base, exp)
        if not base.is_number and exp.q == 1 and abs(exp.p).bit_length() <= 64:
            return sympy.Pow(base, exp)  # x^(10^11) stays a symbolic power; nothing is expanded
        if abs(exp.p) > MAX_EXPONENT or exp.q > 1000:
            raise TooBig("exponent too large")
        if base.is_number and abs(exp.p) > 200:
            # e.g. (sqrt 3)^(5000): sympy would expand to an exact power; bound it like a rational
            approx = _approx_log2(base)
            if approx is None or abs(float(exp)) * max(approx, 1.0) > MAX_POW_BITS:
                raise TooBig("power too large")
        return sympy.Pow(base, exp)
    if exp.is_number:
        # irrational / symbolic-constant exponent: sympy keeps it unevaluated, but keep the magnitude sane
        if exp.has(sympy.oo, -sympy.oo):
            raise ParseError("infinite exponent")
        approx = _approx_abs(exp)
        if approx is None or approx > 1e6:
            raise TooBig("exponent too large")
        return sympy.Pow(base, exp, evaluate=base.is_number is False or approx < 1e4)
    # symbolic exponent: no huge numbers inside it, or sympy may combine b^x * b^(N - x) into b^N
    for atom in exp.atoms(sympy.Number):
        if atom.is_Rational and (abs(atom.p) > MAX_EXPONENT or atom.q > MAX_EXPONENT):
            raise TooBig("large number in a symbolic exponent")
    return sympy.Pow(base, exp)


def _approx_abs(e) -> float | None:
    from reward.numeric import evaluate
    try:
        v = evaluate(e, {})
    except Exception:
        return None
    return float(abs(v))


def _approx_log2(e) -> float | None:
    a = _approx_abs(e)
    if a is None:
        return None
    if a == 0:
        return 0.0
    return abs(math.log2(a)) if math.isfinite(math.log2(a)) else None


def safe_factorial(n):
    if n.is_Integer:
        if n < 0:
            raise ParseError("negative factorial")
        if n > MAX_FACTORIAL:
            raise TooBig("factorial too large")
        return sympy.factorial(n)
    if n.is_number:
        raise ParseError("factorial of a non-integer number")
    return sympy.factorial(n)


def safe_binomial(n, k):
    for v in (n, k):
        if v.is_number:
            if not v.is_Integer:
                raise ParseError("binomial of a non-integer number")
            if abs(v) > MAX_BINOM:
                raise TooBig("binomial too large")
    if k.is_Integer and not n.is_number and abs(k) > 50:
        raise TooBig("symbolic binomial too large")
    return sympy.binomial(n, k)


# ----------------------------------------------------------------------------------------------------------
# Parser


_RELOPS = {"=": "=", "<": "<", ">": ">", "\\le": "<=", "\\ge": ">=", "\\ne": "!=", "\\approx": "=",
           "\\in": "in", "\\equiv": "=", "\\sim": "=", "\\simeq": "=", "\\cong": "="}
_MULOPS = {"*", "\\cdot", "\\times", "\\ast"}
_DIVOPS = {"/", "\\div"}
_MATRIX_ENVS = {"pmatrix", "bmatrix", "Bmatrix", "matrix", "smallmatrix", "array", "vmatrix", "Vmatrix"}


def _num_value(text: str) -> sympy.Rational:
    m = re.fullmatch(r"(\d*)(?:\.(\d*))?(?:\\overline\s*\{?\s*(\d+)\s*\}?)?(?:[eE]([-+]?\d+))?", text)
    if not m:
        raise ParseError(f"bad number {text!r}")
    ip, dp, rp, ep = m.group(1) or "0", m.group(2) or "", m.group(3), m.group(4)
    if rp:
        whole = int(ip + dp + rp) - int(ip + dp)
        val = sympy.Rational(whole, 10 ** len(dp) * (10 ** len(rp) - 1))
    else:
        val = sympy.Rational(int(ip + dp), 10 ** len(dp))
    if ep:
        e = int(ep)
        if abs(e) > 1000:
            raise TooBig("exponent too large")
        val = val * sympy.Rational(10) ** e
    return val


class Parser:
    def __init__(self, toks: list[Tok]):
        self.t = toks
        self.i = 0
        self.depth = 0
        self.abs_depth = 0

    # -- helpers
    def peek(self, k: int = 0) -> Tok | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def at(self, *texts: str) -> bool:
        t = self.peek()
        return t is not None and t.kind in ("op", "cmd", "sep", "rowsep") and t.text in texts

    def at_sep(self) -> bool:
        return self.at(",", ";", "\\\\") or (self.peek() is not None and self.peek().kind == "sep")

    def take(self) -> Tok:
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end")
        self.i += 1
        return t

    def expect(self, text: str) -> Tok:
        t = self.peek()
        if t is None or t.text != text:
            raise ParseError(f"expected {text!r}")
        self.i += 1
        return t

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TooBig("nesting too deep")

    def leave(self):
        self.depth -= 1

    # -- grammar
    def parse_answer(self):
        items = [self.element()]
        while self.at_sep():
            while self.at_sep():  # "1, 2, and 3"
                self.take()
            if self.peek() is None:
                break
            items.append(self.element())
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek().text!r}")
        if len(items) == 1:
            return items[0]
        return Seq("list", items)

    def element(self):
        self.enter()
        try:
            first = self.relation()
            if self.at("\\cup"):
                items = [first]
                while self.at("\\cup"):
                    self.take()
                    items.append(self.relation())
                first = Union(items)
            if self.at("\\setminus", "\\backslash"):
                self.take()
                return SetDiff(first, self.relation())
            return first
        finally:
            self.leave()

    def relation(self):
        start = self.i
        j = start  # the left side's tokens as written (parsing splits words like 'ABC' in place)
        while j < len(self.t) and j - start < 40 and not (self.t[j].text in _RELOPS or self.t[j].kind == "sep"
                                                          or self.t[j].text in (",", ";")):
            j += 1
        lhs_toks = list(self.t[start:j])
        parts = [self.sum()]
        ops = []
        while True:
            t = self.peek()
            if t is None or t.text not in _RELOPS or t.kind not in ("op", "cmd"):
                break
            self.take()
            ops.append(_RELOPS[t.text])
            if ops[-1] == "in":
                parts.append(self.set_operand())
            else:
                parts.append(self.sum())
        if not ops:
            return parts[0]
        return Rel(parts, ops, _simple_lhs(lhs_toks))

    def set_operand(self):
        first = self.sum()
        if self.at("\\cup"):
            items = [first]
            while self.at("\\cup"):
                self.take()
                items.append(self.sum())
            return Union(items)
        return first

    def sum(self):
        self.enter()
        try:
            sign = 1
            lead = None
            if self.at("-"):
                self.take()
                sign = -1
            elif self.at("+"):
                self.take()
            elif self.at("\\pm", "\\mp"):
                lead = PM if self.take().text == "\\pm" else -PM
            acc = self.term()
            if isinstance(acc, (Seq, Mat, Union, SetConst, Rel)):
                if sign == -1 or lead is not None:
                    if isinstance(acc, Mat):
                        acc = Mat([[-x for x in row] for row in acc.rows])
                    else:
                        raise ParseError("sign on a non-scalar")
                if self.at("+", "-", "\\pm", "\\mp"):
                    raise ParseError("sum of non-scalars")
                return acc
            acc = acc * sign if lead is None else acc * lead
            while self.at("+", "-", "\\pm", "\\mp"):
                op = self.take().text
                rhs = self.term()
                _scalar(rhs)
                if op == "+":
                    acc = acc + rhs
                elif op == "-":
                    acc = acc - rhs
                elif op == "\\pm":
                    acc = acc + PM * rhs
                else:
                    acc = acc - PM * rhs
            return _check(acc)
        finally:
            self.leave()

    def term(self):
        acc = self.factor()
        while True:
            t = self.peek()
            if t is None:
                break
            if t.text in _MULOPS and t.kind in ("op", "cmd"):
                self.take()
                rhs = self.factor()
                acc = _mul(acc, rhs)
            elif t.text in _DIVOPS and t.kind in ("op", "cmd"):
                self.take()
                rhs = self.factor()
                acc = _div(acc, rhs)
            elif self.starts_atom(t):
                if t.kind == "num" and self.i > 0 and self.t[self.i - 1].kind == "num":
                    raise ParseError("two numbers side by side")
                rhs = self.factor(implicit=True)
                acc = _mul(acc, rhs)
            else:
                break
        return acc

    def starts_atom(self, t: Tok) -> bool:
        if t.kind in ("num", "word", "begin"):
            return True
        if t.kind == "cmd":
            return t.text not in _RELOPS and t.text not in _MULOPS and t.text not in _DIVOPS and t.text not in (
                "\\pm", "\\mp", "\\cup", "\\cap", "\\}", "\\rfloor", "\\rceil", "\\dots", "\\setminus", "\\to",
                "\\DEG")
        if t.kind == "op":
            if t.text in ("(", "\\{"):
                return True
            if t.text == "{":
                return True
            if t.text == "|":
                return self.abs_depth == 0
        return False

    def factor(self, implicit: bool = False):
        self.enter()
        try:
            if not implicit and self.at("-"):
                self.take()
                v = self.factor()
                return _neg(v)
            if not implicit and self.at("+"):
                self.take()
                return self.factor()
            return self.power()
        finally:
            self.leave()

    def power(self):
        base = self.postfix()
        if self.at("^"):
            self.take()
            exp = self.exponent()
            if isinstance(base, Mat):
                raise ParseError("matrix power")
            base = safe_pow(_scalar(base), _scalar(exp))
            while self.at("!"):  # (a^b)! is rare; just refuse chaining oddities
                raise ParseError("factorial after power")
        return base

    def exponent(self):
        self.enter()
        try:
            t = self.peek()
            if t is None:
                raise ParseError("missing exponent")
            if t.text == "{":
                return self.group()
            if t.text == "-":
                self.take()
                return _neg(self.exponent())
            if t.text == "+":
                self.take()
                return self.exponent()
            if t.kind == "num":
                self.take()
                return _num_value(t.text)
            return self.postfix()
        finally:
            self.leave()

    def postfix(self):
        v = self.atom()
        while True:
            if self.at("!"):
                self.take()
                v = safe_factorial(_scalar(v))
            elif self.at("\\DEG"):
                self.take()
                v = _scalar(v) * DEG
            elif self.at("_") and isinstance(v, sympy.Symbol):
                self.take()
                v = sympy.Symbol(v.name + "_" + self.subscript_name(), real=True)
            elif self.at("'"):
                self.take()
                if isinstance(v, sympy.Symbol):
                    v = sympy.Symbol(v.name + "'", real=True)
                else:
                    raise ParseError("prime")
            else:
                break
        return v

    def subscript_name(self) -> str:
        t = self.take()
        if t.text == "{":
            parts = []
            while not self.at("}"):
                tt = self.take()
                if tt.kind not in ("num", "word", "op", "cmd") or len(parts) > 20:
                    raise ParseError("bad subscript")
                parts.append(tt.text)
            self.take()
            return "".join(parts)
        if t.kind in ("num", "word", "cmd"):
            return t.text[:1] if t.kind == "num" else t.text
        raise ParseError("bad subscript")

    def group(self):
        """{ ... } -> its content (a full answer-level expression)."""
        self.expect("{")
        self.enter()
        try:
            if self.at("}"):
                raise ParseError("empty group")
            v = self.element()
            if self.at(","):
                items = [v]
                while self.at(","):
                    self.take()
                    items.append(self.element())
                v = Seq("list", items)
            self.expect("}")
            return v
        finally:
            self.leave()

    def latex_arg(self):
        """Argument of \\frac/\\sqrt/\\binom: {group}, or a single digit/letter/command (\\frac12)."""
        t = self.peek()
        if t is None:
            raise ParseError("missing argument")
        if t.text == "{":
            return self.group()
        if t.kind == "num":
            self.take()
            digits = t.text
            if not digits[0].isdigit():
                raise ParseError("bad argument")
            first, rest = digits[0], digits[1:]
            if rest:  # \frac123: the argument is '1', '23' goes back to the stream
                self.t.insert(self.i, Tok("num", rest))
            return sympy.Integer(int(first))
        if t.kind == "word":
            self.take()
            if len(t.text) > 1:
                self.t.insert(self.i, Tok("word", t.text[1:]))
            return self.letter(t.text[0])
        if t.kind == "cmd":
            return self.atom()
        raise ParseError("bad argument")

    def letter(self, ch: str):
        if ch == "e":
            return sympy.E
        if ch == "i":
            return sympy.I
        return sympy.Symbol(ch, real=True)

    def bracketed(self, open_text: str):
        self.take()
        self.enter()
        abs_saved = self.abs_depth
        self.abs_depth = 1 if open_text == "\\{" else 0  # in a set, '|' may be set-builder notation
        try:
            items = []
            if open_text == "\\{" and self.at("\\}"):
                self.take()
                return SetConst("empty")
            items.append(self.element())
            if open_text == "\\{" and self.at("|", ":") and isinstance(items[0], sympy.Symbol):
                self.take()  # {x | x > 0}: the condition, when it is an inequality in x
                cond = self.element()
                self.expect("\\}")
                if isinstance(cond, Rel) and any(p == items[0] for p in cond.parts):
                    return cond
                raise ParseError("set-builder condition")
            while self.at(",", ";") or (self.peek() is not None and self.peek().kind == "sep"):
                while self.at(",", ";") or (self.peek() is not None and self.peek().kind == "sep"):
                    self.take()
                items.append(self.element())
            close = self.take()
            if open_text == "\\{":
                if close.text != "\\}":
                    raise ParseError("unbalanced set")
                return Seq("set", items, "{", "}")
            if close.text not in (")", "]"):
                raise ParseError("unbalanced bracket")
            if len(items) == 1:
                if open_text == "(" and close.text == ")" or open_text == "[" and close.text == "]":
                    return items[0]
                raise ParseError("half-open bracket around one item")
            return Seq("tuple", items, open_text, close.text)
        finally:
            self.abs_depth = abs_saved
            self.leave()

    def func_arg(self):
        """Argument of \\sin, \\log, ...: (...), {...}, or an implicit product of simple atoms (\\sin 2x)."""
        t = self.peek()
        if t is None:
            raise ParseError("missing function argument")
        if t.text == "(":
            return _scalar(self.bracketed("("))
        if t.text == "{":
            return _scalar(self.group())
        acc = _scalar(self.power())
        while True:
            t = self.peek()
            if t is None:
                break
            if t.kind in ("num", "word") or (t.kind == "cmd" and (t.text[1:] in GREEK or t.text == "\\pi")):
                acc = acc * _scalar(self.power())
            else:
                break
        return acc

    def atom(self):
        self.enter()
        try:
            return self._atom()
        finally:
            self.leave()

    def _atom(self):
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end")
        if t.kind == "num":
            self.take()
            v = _num_value(t.text)
            # mixed number: 2\frac{1}{2} = 5/2 (integer literal then a proper fraction of literals)
            if v.is_Integer and self.at("\\frac") and "." not in t.text:
                save = self.i
                try:
                    self.take()
                    a = self.latex_arg()
                    b = self.latex_arg()
                    if a.is_Integer and b.is_Integer and 0 < a < b:
                        return v + sympy.Rational(a, b)
                except ParseError:
                    pass
                self.i = save
            return v
        if t.kind == "word":
            self.take()
            w = t.text
            if len(w) > 3:
                raise ParseError(f"word {w!r}")
            if len(w) > 1:
                self.t.insert(self.i, Tok("word", w[1:]))
            return self.letter(w[0])
        if t.kind == "begin":
            return self.matrix()
        if t.kind == "op":
            if t.text in ("(", "["):
                return self.bracketed(t.text)
            if t.text == "{":
                return self.group()
            if t.text == "|":
                self.take()
                self.abs_depth += 1
                try:
                    inner = self.sum()
                finally:
                    self.abs_depth -= 1
                self.expect("|")
                return sympy.Abs(_scalar(inner))
            raise ParseError(f"unexpected {t.text!r}")
        if t.kind == "cmd":
            name = t.text[1:]
            if name == "{":
                return self.bracketed("\\{")
            self.take()
            if name == "frac":
                a = self.latex_arg()
                b = self.latex_arg()
                return _div(a, b)
            if name == "sqrt":
                if self.at("["):
                    self.take()
                    n = self.sum()
                    self.expect("]")
                    arg = _scalar(self.latex_arg())
                    n = _scalar(n)
                    if n == 0:
                        raise ParseError("zeroth root")
                    return safe_pow(arg, _div(sympy.Integer(1), n))
                if self.peek() is not None and self.peek().text == "(":
                    return safe_pow(_scalar(self.bracketed("(")), sympy.Rational(1, 2))
                return safe_pow(_scalar(self.latex_arg()), sympy.Rational(1, 2))
            if name == "binom":
                n = _scalar(self.latex_arg())
                k = _scalar(self.latex_arg())
                return safe_binomial(n, k)
            if name == "pi":
                return sympy.pi
            if name == "infty":
                return sympy.oo
            if name == "REALS":
                return SetConst("R")
            if name == "emptyset":
                return SetConst("empty")
            if name in GREEK:
                return sympy.Symbol(name.replace("var", ""), real=True)
            if name in ("lfloor", "lceil"):
                inner = _scalar(self.sum())
                self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
                return (sympy.floor if name == "lfloor" else sympy.ceiling)(inner)
            if name in ("overline", "bar", "vec", "hat", "tilde", "mathcal", "mathbb", "mathfrak", "mathscr"):
                inner = self.latex_arg()
                return inner
            if name == "exp":
                return safe_pow(sympy.E, self.func_arg())
            if name in FUNCS or name == "lg":
                return self.function(name)
            raise ParseError(f"unknown command \\{name}")
        raise ParseError(f"unexpected {t.text!r}")

    def function(self, name: str):
        power = None
        base = None
        if name == "log" and self.at("_"):
            self.take()
            base = _scalar(self.latex_arg() if not self.at("(") else self.bracketed("("))
        if self.at("^"):
            self.take()
            power = _scalar(self.exponent())
        if name == "log" and base is None and self.at("_"):
            self.take()
            base = _scalar(self.latex_arg())
        arg = self.func_arg()
        if power is not None and power == -1 and name in INVERSE:
            return INVERSE[name](arg)
        if name == "lg":
            val = sympy.log(arg, 10)
        elif name == "log" and base is not None:
            if base.is_number and (base == 1 or base == 0):
                raise ParseError("log base")
            val = sympy.log(arg) / sympy.log(base)
        else:
            if arg.has(sympy.oo, -sympy.oo):
                raise ParseError("function of infinity")
            val = FUNCS[name](arg)
        if power is not None:
            val = safe_pow(val, power)
        return val

    def matrix(self):
        begin = self.take()
        env = begin.env
        if env not in _MATRIX_ENVS:
            raise ParseError(f"environment {env}")
        rows, row = [], []
        self.enter()
        try:
            while True:
                t = self.peek()
                if t is None:
                    raise ParseError("unclosed matrix")
                if t.kind == "end":
                    self.take()
                    if row:
                        rows.append(row)
                    break
                if t.kind == "rowsep":
                    self.take()
                    rows.append(row)
                    row = []
                    continue
                row.append(_scalar(self.sum()))
                if self.at("&"):
                    self.take()
                    if self.peek() is not None and (self.peek().kind in ("rowsep", "end")):
                        raise ParseError("empty cell")
        finally:
            self.leave()
        rows = [r for r in rows if r]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged matrix")
        if env in ("vmatrix", "Vmatrix"):
            if len(rows) != len(rows[0]) or len(rows) > 4 or not all(x.is_number for r in rows for x in r):
                raise ParseError("determinant")
            return sympy.Matrix(rows).det()
        return Mat(rows)


def _simple_lhs(toks: list[Tok]) -> bool:
    """x, y_1, \\theta, f(x), P(A): a left side that only names the answer."""
    if not toks:
        return False
    t0 = toks[0]
    if t0.kind == "word" and 2 <= len(t0.text) <= 4 and t0.text.isupper() and len(toks) == 1:
        return True  # a segment or angle named by points: AB = 5, ABC = 30
    if not (t0.kind == "word" and len(t0.text) == 1 or t0.kind == "cmd" and t0.text[1:] in GREEK):
        return False
    rest = toks[1:]
    if [t.text for t in rest[:5]] == ["^", "{", "-", "1", "}"]:
        rest = rest[5:]
    elif [t.text for t in rest[:3]] == ["^", "-", "1"]:
        rest = rest[3:]
    while rest and rest[0].text == "'":
        rest = rest[1:]
    if rest and rest[0].text == "_":
        if len(rest) >= 2 and rest[1].text == "{":
            k = next((j for j, t in enumerate(rest) if t.text == "}"), None)
            if k is None:
                return False
            rest = rest[k + 1:]
        else:
            rest = rest[2:]
    if not rest:
        return True
    if rest[0].text == "(" and rest[-1].text == ")" and all(t.text not in ("(", ")") for t in rest[1:-1]):
        return True
    return False


def _scalar(v):
    if isinstance(v, sympy.Basic) and not isinstance(v, sympy.MatrixBase):
        return v
    raise ParseError("expected a scalar")


def _check(v):
    if isinstance(v, sympy.Basic) and v.has(sympy.zoo, sympy.nan):
        raise ParseError("undefined value")
    return v


def _neg(v):
    if isinstance(v, Mat):
        return Mat([[-x for x in row] for row in v.rows])
    return -_scalar(v)


def _mul(a, b):
    if isinstance(a, Mat) and isinstance(b, sympy.Basic) and not isinstance(b, sympy.MatrixBase):
        return Mat([[x * b for x in row] for row in a.rows])
    if isinstance(b, Mat) and isinstance(a, sympy.Basic) and not isinstance(a, sympy.MatrixBase):
        return Mat([[a * x for x in row] for row in b.rows])
    return _check(_scalar(a) * _scalar(b))


def _div(a, b):
    a, b = _scalar(a), _scalar(b)
    if b == 0:
        raise ParseError("division by zero")
    return _check(a / b)


# ----------------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class Parsed:
    value: object = None          # None if it could not be parsed as math
    flags: Flags = field(default_factory=Flags)
    cleaned: str = ""             # after clean(); used for string / text comparison
    error: str = ""


def subs_value(v, sym, val):
    """Substitute a placeholder symbol everywhere in a parsed value."""
    if isinstance(v, sympy.Basic):
        return _check(v.subs(sym, val)) if v.has(sym) else v
    if isinstance(v, Seq):
        return Seq(v.kind, [subs_value(x, sym, val) for x in v.items], v.open, v.close)
    if isinstance(v, Rel):
        return Rel([subs_value(x, sym, val) for x in v.parts], v.ops, v.simple_lhs)
    if isinstance(v, Union):
        return Union([subs_value(x, sym, val) for x in v.items])
    if isinstance(v, Mat):
        return Mat([[subs_value(x, sym, val) for x in row] for row in v.rows])
    return v


def has_symbol(v, sym) -> bool:
    if isinstance(v, sympy.Basic):
        return v.has(sym)
    if isinstance(v, Seq):
        return any(has_symbol(x, sym) for x in v.items)
    if isinstance(v, Rel):
        return any(has_symbol(x, sym) for x in v.parts)
    if isinstance(v, Union):
        return any(has_symbol(x, sym) for x in v.items)
    if isinstance(v, Mat):
        return any(has_symbol(x, sym) for row in v.rows for x in row)
    return False


def expand_pm(v):
    """Replace the \\pm placeholder: 1 \\pm \\sqrt 2 -> [1 + sqrt 2, 1 - sqrt 2]."""
    if isinstance(v, sympy.Basic):
        if v.has(PM):
            return Seq("list", [_check(v.subs(PM, 1)), _check(v.subs(PM, -1))])
        return v
    if isinstance(v, Rel):
        if any(isinstance(p, sympy.Basic) and p.has(PM) for p in v.parts):
            plus = Rel([p.subs(PM, 1) if isinstance(p, sympy.Basic) else p for p in v.parts], v.ops, v.simple_lhs)
            minus = Rel([p.subs(PM, -1) if isinstance(p, sympy.Basic) else p for p in v.parts], v.ops, v.simple_lhs)
            return Seq("list", [plus, minus])
        return v
    if isinstance(v, Seq):
        items = []
        for it in v.items:
            e = expand_pm(it)
            if isinstance(e, Seq) and e.kind == "list" and not (isinstance(it, Seq) and it.kind == "list"):
                if v.kind == "tuple":
                    raise ParseError("\\pm inside a tuple")
                items.extend(e.items)
            else:
                items.append(e)
        return Seq(v.kind, items, v.open, v.close)
    if isinstance(v, Mat):
        if any(x.has(PM) for row in v.rows for x in row):
            raise ParseError("\\pm in a matrix")
        return v
    return v


def parse_answer(s: str) -> Parsed:
    if not isinstance(s, str) or len(s) > MAX_CHARS:
        return Parsed(error="too long")
    cleaned, flags = clean(s)
    out = Parsed(flags=flags, cleaned=cleaned)
    if not cleaned:
        out.error = "empty"
        return out
    try:
        toks = tokenize(cleaned)
        stripped = strip_units(toks)
        if len(stripped) < len(toks):
            flags.units = canonical_units(toks[len(stripped):] if stripped[-1].text != "*" else [])
        toks = stripped
        if is_text_like(toks):
            flags.text_like = True
            out.error = "text"
            return out
        value = Parser(toks).parse_answer()
        out.value = expand_pm(value)
    except RecursionError:
        out.error = "too deep"
    except ParseError as exc:
        out.error = str(exc) or type(exc).__name__
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, AttributeError, IndexError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out
