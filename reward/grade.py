"""Is a predicted answer string equivalent to the reference answer string?

Order of checks (see docs/reward.md):
  multiple-choice letters -> identical after clean-up -> word answers (text) -> parsed math values:
  numbers exactly (0.5 = 1/2, 0.333 != 1/3, 025 = 25), expressions numerically at random points with 60-digit
  arithmetic (falling back to sympy.simplify on small trees), equations / inequalities / intervals / sets /
  tuples / unordered answer lists / matrices structurally.
"""

from __future__ import annotations

import random
import re

import sympy

from reward.numeric import DPS, NumericError, evaluate, _CTX
from reward.parse import (DEG, Mat, Parsed, ParseError, Rel, Seq, SetConst, SetDiff, Union, has_symbol, parse_answer,
                          subs_value, text_form)

_TOL = _CTX.mpf(10) ** (-(DPS - 20))

_MC_GOLD = re.compile(r"^\(?\s*([A-J])\s*\)?$")
_MC_PRED = re.compile(r"^(?:(?:option|choice|answer)\s*:?\s*)?\(?\s*([A-Ja-j])\s*\)?(?=$|[\s.:,)])(?!(?-i:\s+[a-z]))", re.I)

# Unsimplified arithmetic: numeric literals joined by + - x / (\\frac{a}{b} and a/b count as literals), e.g.
# "13 - 17" or "3 \\times 4". A careful grader does not accept the question's own computation, left undone, as
# its answer: an RL policy that boxes the question's expression would otherwise collect full reward.
_LITERAL = r"(?:\d+(?:\.\d+)?|\.\d+|\\[dt]?frac\{\d+\}\{\d+\})"
_BINARY_OP = r"(?:[-+*\u00d7\u00b7\u00f7]|\\times|\\cdot|\\div)"
_TERM = rf"[(\s]*[-+]?\s*{_LITERAL}(?:\s*/\s*{_LITERAL})?[)\s]*"
_UNSIMPLIFIED = re.compile(rf"^{_TERM}(?:{_BINARY_OP}{_TERM})+$")


def unsimplified_arithmetic(cleaned: str) -> bool:
    """'13 - 17', '3 \\times 4', '(2+3)*4': an answer that is still a computation on plain numbers."""
    answer = cleaned.rsplit("=", 1)[-1].strip()  # 'x = 2 + 3': the answer side
    return bool(_UNSIMPLIFIED.match(answer))


def _plain_number(v) -> bool:
    return isinstance(v, sympy.Basic) and v.is_number and (v.is_Rational or v.is_Float)


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def _mc_letter_gold(cleaned: str) -> str | None:
    m = _MC_GOLD.match(cleaned.strip())
    return m.group(1) if m else None


_MC_NAMED = re.compile(r"\(([A-J])\)|(?:option|choice|answer)\s*:?\s*\(?([A-J])\b|(?<![A-Za-z\\'])([A-J])(?![A-Za-z'])"
                       r"(?!(?-i:\s+[a-z]))", re.I)


def _mc_letter_pred(cleaned: str) -> str | None:
    """The option a prediction names: '(B)', 'B', 'B) 12', '\\textbf{(B)} 48', 'I choose C', 'option d'."""
    text = cleaned.strip()
    letters = set()
    for m in _MC_NAMED.finditer(text):
        if m.group(1) or m.group(2):
            letters.add((m.group(1) or m.group(2)).upper())
        elif m.group(3).isupper():  # a bare capital not used as a word ('I think', 'A cat')
            letters.add(m.group(3))
    m = _MC_PRED.match(text)
    if m:
        letters.add(m.group(1).upper())
    return letters.pop() if len(letters) == 1 else None  # "(C) and (D)" names two options: no single answer


# ----------------------------------------------------------------------------------------------------------
# Scalars


def _points(names: list[str], trials: int = 4):
    rng = random.Random(20240917)
    for t in range(trials):
        env = {}
        for n in names:
            mag = rng.uniform(0.3, 2.7)
            sign = -1 if (t % 2 == 1 and rng.random() < 0.7) else 1
            env[n] = _CTX.mpf(sign * mag) + _CTX.mpf(rng.random()) / 10 ** 7
        yield env


def _close(a, b) -> bool:
    scale = max(_CTX.mpf(1), abs(a), abs(b))
    return abs(a - b) <= _TOL * scale


def scalar_equal(a, b) -> bool:
    if a == b:
        return True
    inf = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
    if a.has(*inf) or b.has(*inf):
        return False
    if a.is_Rational and b.is_Rational:
        return False
    try:
        d = a - b
        if d == 0:
            return True
    except Exception:  # pragma: no cover
        return False
    names = sorted({s.name for s in a.free_symbols | b.free_symbols})
    if len(names) > 10:
        return False
    good = 0
    with _CTX.workdps(DPS):
        for env in _points(names, 4 if names else 1):
            try:
                va = evaluate(a, env)
                vb = evaluate(b, env)
            except (NumericError, ZeroDivisionError, ValueError, OverflowError, TypeError):
                continue
            if not _close(va, vb):
                return False
            good += 1
    if good >= (2 if names else 1):
        return True
    # numerics were inconclusive (e.g. unsupported functions): a symbolic check, on small tame trees only
    try:
        if _tame(d):
            return sympy.simplify(d) == 0
    except Exception:
        return False
    return False


def _tame(e, max_nodes: int = 80, max_exponent: int = 12) -> bool:
    """Small tree, small integer exponents, small numbers: safe to hand to sympy.simplify."""
    n = 0
    for node in sympy.preorder_traversal(e):
        n += 1
        if n > max_nodes:
            return False
        if node.is_Pow and node.exp.is_number:
            if not node.exp.is_Rational or abs(node.exp.p) > max_exponent or node.exp.q > max_exponent:
                return False
        if node.is_Rational and (abs(node.p) > 10 ** 12 or node.q > 10 ** 12):
            return False
    return True


def _is_scalar(v) -> bool:
    return isinstance(v, sympy.Basic) and not isinstance(v, sympy.MatrixBase)


# ----------------------------------------------------------------------------------------------------------
# Sets and intervals


def _is_intervalish(v) -> bool:
    if isinstance(v, (SetConst, Union, SetDiff)):
        return True
    if isinstance(v, Rel):
        return any(op not in ("=",) for op in v.ops)
    if isinstance(v, Seq):
        if v.kind == "tuple" and len(v.items) == 2:
            if (v.open, v.close) != ("(", ")"):
                return True
            return any(_is_scalar(x) and x.has(sympy.oo, -sympy.oo) for x in v.items)
        if v.kind == "list":
            return any(_is_intervalish(x) for x in v.items)
    return False


def _real_number(x) -> bool:
    return _is_scalar(x) and (x in (sympy.oo, -sympy.oo) or (x.is_number and x.is_real is not False))


def to_set(v):
    """A sympy Set for interval-like values, else None."""
    try:
        if isinstance(v, SetConst):
            return sympy.S.Reals if v.name == "R" else sympy.S.EmptySet
        if isinstance(v, Seq):
            if v.kind == "tuple" and len(v.items) == 2:
                a, b = v.items
                if not (_is_scalar(a) and _is_scalar(b)):
                    return None
                if a.is_number and b.is_number:
                    if not (_real_number(a) and _real_number(b)):
                        return None
                    if not bool(sympy.Lt(a, b)):
                        return None
                return sympy.Interval(a, b, v.open == "(", v.close == ")")
            if v.kind == "set":
                if all(_is_scalar(x) for x in v.items):
                    return sympy.FiniteSet(*v.items)
                return None
            if v.kind == "list":
                sets = [to_set(x) for x in v.items]
                return None if any(s is None for s in sets) else sympy.Union(*sets)
            return None
        if isinstance(v, Union):
            sets = [to_set(x) for x in v.items]
            return None if any(s is None for s in sets) else sympy.Union(*sets)
        if isinstance(v, SetDiff):
            a, b = to_set(v.left), to_set(v.right)
            return None if a is None or b is None else sympy.Complement(a, b)
        if isinstance(v, Rel):
            if v.ops == ["in"]:
                return to_set(v.parts[1])
            return _inequality_set(v)
        if _is_scalar(v) and v.is_number and _real_number(v):
            return sympy.FiniteSet(v)
    except (TypeError, ValueError, ParseError):
        return None
    return None


_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}


def _inequality_set(r: Rel):
    parts, ops = r.parts, r.ops
    if ops == ["!="] and all(_is_scalar(p) for p in parts):  # x != 2  ->  (-oo, 2) U (2, oo)
        var, other = (parts[0], parts[1]) if isinstance(parts[0], sympy.Symbol) else (parts[1], parts[0])
        if isinstance(var, sympy.Symbol) and not other.has(var) and _real_number(other):
            return sympy.Union(sympy.Interval.open(-sympy.oo, other), sympy.Interval.open(other, sympy.oo))
        return None
    if any(op not in ("<", ">", "<=", ">=", "=") for op in ops) or not all(_is_scalar(p) for p in parts):
        return None
    syms = [i for i, p in enumerate(parts) if isinstance(p, sympy.Symbol)]
    if len(syms) != 1:
        return None
    k = syms[0]
    var = parts[k]
    if any(p.has(var) for j, p in enumerate(parts) if j != k):
        return None
    lo, hi, lo_open, hi_open = -sympy.oo, sympy.oo, True, True

    def bound(op_var_other: str, other):
        nonlocal lo, hi, lo_open, hi_open
        if op_var_other in ("<", "<="):
            hi, hi_open = other, op_var_other == "<"
        elif op_var_other in (">", ">="):
            lo, lo_open = other, op_var_other == ">"
        else:
            lo = hi = other
            lo_open = hi_open = False

    if k > 0:  # other op var  ->  var flipped-op other
        op = ops[k - 1]
        bound(_FLIP.get(op, op), parts[k - 1])
    if k < len(parts) - 1:
        bound(ops[k], parts[k + 1])
    if len(parts) > 3 or (len(parts) == 3 and k != 1):
        return None
    if not (_real_number(lo) and _real_number(hi)):
        return None
    return sympy.Interval(lo, hi, lo_open, hi_open)


def _sets_equal(s1, s2) -> bool:
    if s1 == s2:
        return True
    # endpoints that sympy did not canonicalise identically
    if isinstance(s1, sympy.Interval) and isinstance(s2, sympy.Interval):
        return (s1.left_open == s2.left_open and s1.right_open == s2.right_open and
                scalar_equal(s1.start, s2.start) and scalar_equal(s1.end, s2.end))
    if isinstance(s1, sympy.FiniteSet) and isinstance(s2, sympy.FiniteSet):
        return _unordered(list(s1.args), list(s2.args))
    if isinstance(s1, sympy.Union) and isinstance(s2, sympy.Union) and len(s1.args) == len(s2.args):
        return _unordered_sets(list(s1.args), list(s2.args))
    return False


def _unordered_sets(a, b) -> bool:
    return all(any(_sets_equal(x, y) for y in b) for x in a) and all(any(_sets_equal(x, y) for x in a) for y in b)


# ----------------------------------------------------------------------------------------------------------
# Structured values


def _unordered(p_items, g_items) -> bool:
    if len(p_items) > 30 or len(g_items) > 30:
        return False
    return (all(any(values_equal(x, y) for y in g_items) for x in p_items) and
            all(any(values_equal(x, y) for x in p_items) for y in g_items))


def _ordered(p_items, g_items) -> bool:
    return len(p_items) == len(g_items) and all(values_equal(x, y) for x, y in zip(p_items, g_items))


def _answer_side(r: Rel):
    """'x = 5', 'f(x) = 2x+1', '2 + 3 = 5', 'x = 2 + 3 = 5' -> the value after the last '='; else None."""
    if not all(op == "=" for op in r.ops):
        if r.ops == ["in"] and r.simple_lhs:
            return r.parts[1]
        return None
    if r.simple_lhs:
        return r.parts[-1]
    first = r.parts[0]
    if _is_scalar(first) and not first.free_symbols:
        return r.parts[-1]
    return None


def _equations_equal(p: Rel, g: Rel) -> bool:
    if not (all(op == "=" for op in p.ops) and all(op == "=" for op in g.ops)):
        return False
    if len(p.parts) != 2 or len(g.parts) != 2 or not all(_is_scalar(x) for x in p.parts + g.parts):
        return False
    dp = p.parts[0] - p.parts[1]
    dg = g.parts[0] - g.parts[1]
    if dp == 0 or dg == 0:
        return False
    names = sorted({s.name for s in dp.free_symbols | dg.free_symbols})
    if not names or len(names) > 10:
        return False
    ratios = []
    with _CTX.workdps(DPS):
        for env in _points(names, 5):
            try:
                a = evaluate(dp, env)
                b = evaluate(dg, env)
            except (NumericError, ZeroDivisionError, ValueError, OverflowError, TypeError):
                continue
            if abs(b) < _TOL:
                if abs(a) < _TOL:
                    continue
                return False
            ratios.append(a / b)
    if len(ratios) < 2 or abs(ratios[0]) < _TOL:
        return False
    return all(_close(r, ratios[0]) for r in ratios[1:])


def _rels_equal(p: Rel, g: Rel) -> bool:
    if p.ops == g.ops and len(p.parts) == len(g.parts):
        if all(values_equal(x, y) for x, y in zip(p.parts, g.parts)):
            return True
    rev = [_FLIP.get(op, op) for op in reversed(p.ops)]
    if rev == g.ops and all(values_equal(x, y) for x, y in zip(reversed(p.parts), g.parts)):
        return True
    pa, ga = _answer_side(p), _answer_side(g)
    if pa is not None and ga is not None and p.simple_lhs and g.simple_lhs:
        # x = 5 vs y = 5: the named quantity must be the same one
        return p.parts[0] == g.parts[0] and values_equal(pa, ga)
    if _equations_equal(p, g):
        return True
    return False


def values_equal(p, g) -> bool:
    if isinstance(p, Rel) and isinstance(g, Rel):
        if _rels_equal(p, g):
            return True
    elif isinstance(g, Rel) and not isinstance(p, Rel):
        ga = _answer_side(g)
        if ga is not None and values_equal(p, ga):
            return True
    elif isinstance(p, Rel) and not isinstance(g, Rel):
        pa = _answer_side(p)
        if pa is not None and values_equal(pa, g):
            return True

    if _is_intervalish(p) or _is_intervalish(g):
        sp, sg = to_set(p), to_set(g)
        if sp is not None and sg is not None:
            return _sets_equal(sp, sg)

    if _is_scalar(p) and _is_scalar(g):
        return scalar_equal(p, g)

    if isinstance(p, Seq) and isinstance(g, Seq):
        kinds = {p.kind, g.kind}
        if p.kind == "tuple" and g.kind == "tuple":
            if len(p.items) != len(g.items):
                return False
            if len(p.items) == 2 and (p.open, p.close) != (g.open, g.close):
                return False
            return _ordered(p.items, g.items)
        if kinds <= {"set", "list"}:
            return _unordered(p.items, g.items)
        if kinds == {"tuple", "list"}:
            t = p if p.kind == "tuple" else g
            if (t.open, t.close) == ("(", ")"):
                # gold "(1, 2)" is ordered; gold "1, 2" (a list of solutions) is not
                return _ordered(p.items, g.items) if g.kind == "tuple" else _unordered(p.items, g.items)
        return False

    if isinstance(p, Mat) and isinstance(g, Mat):
        if len(p.rows) != len(g.rows) or len(p.rows[0]) != len(g.rows[0]):
            return False
        return all(scalar_equal(x, y) for rp, rg in zip(p.rows, g.rows) for x, y in zip(rp, rg))
    if isinstance(p, Mat) or isinstance(g, Mat):  # a vector written as a matrix vs as a tuple
        m, o = (p, g) if isinstance(p, Mat) else (g, p)
        flat = [x for row in m.rows for x in row]
        if (len(m.rows) == 1 or len(m.rows[0]) == 1) and isinstance(o, Seq) and o.kind == "tuple" \
                and (o.open, o.close) == ("(", ")"):
            return _ordered(flat, o.items)
        return False

    # a one-element list/set against a single value: {5} vs 5
    if isinstance(p, Seq) and len(p.items) == 1 and p.kind in ("set", "list") and not isinstance(g, Seq):
        return values_equal(p.items[0], g)
    if isinstance(g, Seq) and len(g.items) == 1 and g.kind in ("set", "list") and not isinstance(p, Seq):
        return values_equal(p, g.items[0])
    return False


# ----------------------------------------------------------------------------------------------------------
# Entry point


def _candidates(parsed: Parsed):
    """Readings of a value: degree marks dropped (45° = 45) or as pi/180 (sin 30° = 1/2); 50% as 50 or 1/2."""
    v = parsed.value
    out = [v]
    if has_symbol(v, DEG):
        out = [subs_value(v, DEG, 1), subs_value(v, DEG, sympy.pi / 180)]
    if parsed.flags.percent:
        out += [x / 100 for x in out if _is_scalar(x)]
    return out


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def equivalent(pred: str | None, gold: str | None) -> bool:
    """True if the extracted prediction is equivalent to the (extracted) reference answer."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if not pred.strip() or not gold.strip():
        return False
    P = parse_answer(pred)
    G = parse_answer(gold)
    if P.error == "too long" or G.error == "too long":
        return False
    if not P.cleaned or not G.cleaned:
        return False
    letter = _mc_letter_gold(G.cleaned)
    if letter is not None:
        got = _mc_letter_pred(P.cleaned)
        if got is not None:
            return got == letter
    if _squash(P.cleaned) == _squash(G.cleaned):
        return True
    pt, gt = text_form(P.cleaned), text_form(G.cleaned)
    if G.flags.text_like or P.flags.text_like or P.value is None or G.value is None:
        if pt and pt == gt and (G.flags.text_like or P.flags.text_like):
            return True
        if P.flags.text_like and not G.flags.text_like:
            # "\text{The area is } 6": a sentence inside the box that ends in the answer
            m = re.search(r"(?:\bis\b|\bare\b|\bequals\b|=|\banswer\s*:)([^=:]*)$", P.cleaned, re.I)
            if m and m.group(1).strip() and G.value is not None:
                tail = parse_answer(m.group(1).strip())
                if tail.value is not None and not tail.flags.text_like and not (
                        _plain_number(G.value) and unsimplified_arithmetic(tail.cleaned)):
                    return any(values_equal(pv, gv) for pv in _candidates(tail) for gv in _candidates(G))
        # number words: 'five' vs 5
        if pt in _NUMBER_WORDS and G.value is not None:
            P2 = parse_answer(_NUMBER_WORDS[pt])
            return values_equal(P2.value, G.value)
        if gt in _NUMBER_WORDS and P.value is not None:
            G2 = parse_answer(_NUMBER_WORDS[gt])
            return values_equal(P.value, G2.value)
        return False
    if _plain_number(G.value) and unsimplified_arithmetic(P.cleaned) and not unsimplified_arithmetic(G.cleaned):
        return False  # '\\boxed{13 - 17}' for -4: the computation was left undone
    if P.flags.units and G.flags.units and P.flags.units != G.flags.units:
        return False  # "6 inches" vs "6 feet": both name a unit, and not the same one
    for pv in _candidates(P):
        for gv in _candidates(G):
            try:
                if values_equal(pv, gv):
                    return True
            except (ParseError, NumericError, TypeError, ValueError, ZeroDivisionError, AttributeError):
                continue
    return False
