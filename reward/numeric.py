"""A guarded numeric evaluator for the sympy trees our parser builds (mpmath, 60 digits).

Walks the tree itself (no lambdify, no evalf on hostile trees) and gives up -- raising NumericError -- on
anything it does not know, on values that overflow a sane magnitude, and on huge exponents.
"""

from __future__ import annotations

import mpmath
import sympy

DPS = 60
MAX_MAG = 10 ** 5          # refuse exp()/powers whose log-magnitude exceeds this


class NumericError(Exception):
    pass


_CTX = mpmath.MPContext()
_CTX.dps = DPS


def _mag_ok(v):
    if v == 0:
        return v
    try:
        m = _CTX.mag(v)
    except Exception as exc:  # pragma: no cover
        raise NumericError(str(exc)) from None
    if abs(m) > MAX_MAG * 4:
        raise NumericError("magnitude")
    return v


def _real(v):
    if isinstance(v, mpmath.ctx_mp_python.mpc):
        if abs(v.imag) > _CTX.mpf(10) ** (-DPS + 10) * max(1, abs(v.real)):
            raise NumericError("complex argument")
        return v.real
    return v


_F1 = {
    sympy.sin: "sin", sympy.cos: "cos", sympy.tan: "tan", sympy.cot: "cot", sympy.sec: "sec", sympy.csc: "csc",
    sympy.asin: "asin", sympy.acos: "acos", sympy.atan: "atan", sympy.acot: "acot",
    sympy.sinh: "sinh", sympy.cosh: "cosh", sympy.tanh: "tanh", sympy.coth: "coth",
    sympy.asinh: "asinh", sympy.acosh: "acosh", sympy.atanh: "atanh",
}


def evaluate(e, env: dict, depth: int = 0):
    """Numeric value (mpf/mpc) of e with symbols bound by env (name -> mpf). Raises NumericError."""
    if depth > 200:
        raise NumericError("too deep")
    ctx = _CTX
    if e.is_Integer:
        return ctx.mpf(int(e))
    if e.is_Rational:
        return ctx.mpf(int(e.p)) / int(e.q)
    if e is sympy.pi:
        return +ctx.pi
    if e is sympy.E:
        return +ctx.e
    if e is sympy.I:
        return ctx.mpc(0, 1)
    if e.is_Symbol:
        if e.name in env:
            return env[e.name]
        raise NumericError(f"unbound {e.name}")
    if e.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        raise NumericError("infinite")
    args = e.args
    if e.is_Add:
        acc = ctx.mpf(0)
        for a in args:
            acc = acc + evaluate(a, env, depth + 1)
        return _mag_ok(acc)
    if e.is_Mul:
        acc = ctx.mpf(1)
        for a in args:
            acc = acc * evaluate(a, env, depth + 1)
        return _mag_ok(acc)
    if e.is_Pow:
        b = evaluate(args[0], env, depth + 1)
        x = evaluate(args[1], env, depth + 1)
        if b == 0:
            if ctx.re(x) > 0:
                return ctx.mpf(0)
            raise NumericError("0 to a non-positive power")
        lm = ctx.log(abs(b)) if b != 0 else 0
        if abs(ctx.re(x) * lm) > MAX_MAG or abs(ctx.im(x)) > MAX_MAG:
            raise NumericError("power too large")
        if args[1].is_Integer and not isinstance(b, mpmath.ctx_mp_python.mpc):
            return _mag_ok(b ** int(args[1]))
        return _mag_ok(ctx.power(b, x))
    if isinstance(e, sympy.exp):
        x = evaluate(args[0], env, depth + 1)
        if abs(ctx.re(x)) > MAX_MAG:
            raise NumericError("exp too large")
        return _mag_ok(ctx.exp(x))
    if isinstance(e, sympy.log):
        x = evaluate(args[0], env, depth + 1)
        if x == 0:
            raise NumericError("log 0")
        v = ctx.log(x)
        if len(args) == 2:
            b = evaluate(args[1], env, depth + 1)
            lb = ctx.log(b)
            if lb == 0:
                raise NumericError("log base 1")
            v = v / lb
        return v
    fn = _F1.get(type(e))
    if fn is not None:
        x = evaluate(args[0], env, depth + 1)
        if abs(ctx.im(x)) > 1000:
            raise NumericError("trig of huge imaginary")
        try:
            return _mag_ok(getattr(ctx, fn)(x))
        except (ZeroDivisionError, ValueError) as exc:
            raise NumericError(str(exc)) from None
    if isinstance(e, sympy.Abs):
        return abs(evaluate(args[0], env, depth + 1))
    if isinstance(e, sympy.floor):
        return ctx.floor(_real(evaluate(args[0], env, depth + 1)))
    if isinstance(e, sympy.ceiling):
        return ctx.ceil(_real(evaluate(args[0], env, depth + 1)))
    if isinstance(e, sympy.factorial):
        x = evaluate(args[0], env, depth + 1)
        if abs(x) > 5000:
            raise NumericError("factorial too large")
        return _mag_ok(ctx.gamma(x + 1))
    if isinstance(e, sympy.gamma):
        x = evaluate(args[0], env, depth + 1)
        if abs(x) > 5000:
            raise NumericError("gamma too large")
        return _mag_ok(ctx.gamma(x))
    if isinstance(e, sympy.binomial):
        n = evaluate(args[0], env, depth + 1)
        k = evaluate(args[1], env, depth + 1)
        if abs(n) > 10000 or abs(k) > 10000:
            raise NumericError("binomial too large")
        return _mag_ok(ctx.binomial(n, k))
    if e.is_Function and len(args) == 1 and type(e).__name__ in ("re", "im", "sign"):
        x = evaluate(args[0], env, depth + 1)
        name = type(e).__name__
        if name == "re":
            return ctx.re(x)
        if name == "im":
            return ctx.im(x)
        return ctx.sign(_real(x))
    raise NumericError(f"unsupported {type(e).__name__}")
