"""Model output is hostile input: nothing in reward/ may evaluate it, and nothing may hang on it."""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reward_cases import CASES

from reward import score

REWARD_DIR = Path(__file__).resolve().parents[2] / "reward"
FORBIDDEN = {"eval", "exec", "compile", "sympify", "parse_expr", "parse_latex", "lambdify", "__import__",
             "S", "simplify_logic", "latex2sympy"}
PAYLOADS = [
    r"\boxed{__import__('os').system('touch {p}')}",
    r"\boxed{exec(\"open('{p}','w')\")}",
    r"\boxed{eval(\"__import__('os').system('touch {p}')\")}",
    r"The answer is __import__('os').system('touch {p}')",
    r"\boxed{().__class__.__base__.__subclasses__()}",
    r"#### __import__('subprocess').run(['touch', '{p}'])",
    r"\boxed{\text{__import__('os').system('touch {p}')}}",
    r"$__import__('os').system('touch {p}')$",
    r"Lambda(x, __import__('os').system('touch {p}'))",
]


def _install_traps(monkeypatch, calls: list):
    """eval/exec of a *string* (imports exec code objects, which is fine) and sympy's parse_expr record a hit."""
    real_eval, real_exec = builtins.eval, builtins.exec

    def trap(name, real):
        def _f(src, *a, **k):
            if isinstance(src, (str, bytes)):
                calls.append(name)
                raise AssertionError(f"{name} called on a string")
            return real(src, *a, **k)
        return _f

    def parse_trap(*a, **k):
        calls.append("parse_expr")
        raise AssertionError("parse_expr called")

    monkeypatch.setattr(builtins, "eval", trap("eval", real_eval))
    monkeypatch.setattr(builtins, "exec", trap("exec", real_exec))
    import sympy.parsing.sympy_parser as sp  # what sympify(str) would use

    monkeypatch.setattr(sp, "parse_expr", parse_trap)


def test_no_evaluating_calls_in_reward_sources():
    """AST scan: no call to eval/exec/compile/sympify/parse_expr/parse_latex/lambdify/__import__ (or S('...'))."""
    offenders = []
    for path in sorted(REWARD_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in FORBIDDEN and not (name == "compile" and isinstance(f, ast.Attribute)):  # re.compile
                    offenders.append(f"{path.name}:{node.lineno} {name}(...)")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name.split(".")[-1] in FORBIDDEN or "parsing" in (getattr(node, "module", "") or ""):
                        offenders.append(f"{path.name}:{node.lineno} import {alias.name}")
    assert not offenders, offenders


@pytest.mark.parametrize("template", PAYLOADS)
def test_payloads_do_not_execute(template, tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    payload = template.replace("{p}", str(target))
    calls = []

    _install_traps(monkeypatch, calls)
    for gold in ("0", "1", payload):
        assert score(payload, gold) in (0.0, 1.0)
    assert not target.exists()
    assert not calls


def test_whole_case_set_never_reaches_eval(monkeypatch):
    """Run every case with eval/exec/parse_expr booby-trapped: the verifier never evaluates strings."""
    calls = []
    _install_traps(monkeypatch, calls)
    for c in CASES:
        score(c.response, c.gold)  # the verifier swallows exceptions, so the traps record their hits
    assert not calls
    assert score(r"\boxed{(x+1)^2}", "x^2+2x+1") == 1.0


@pytest.mark.parametrize("response", [
    r"\boxed{9^{9^{9^9}}}",
    r"\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}",
    r"\boxed{10^{10^{100}}}",
    r"\boxed{(10^{100})^{10^{100}}}",
    r"\boxed{\left(\sqrt{2}\right)^{10^{12}}}",
    r"\boxed{10^{10^{10}} - 10^{10^{10}}}",
    r"\boxed{1000000!}",
    r"\boxed{(100!)!}",
    r"\boxed{((5!)!)!}",
    r"\boxed{\binom{10^{9}}{5 \cdot 10^{8}}}",
    r"\boxed{e^{e^{e^{e^{e^{e^{10}}}}}}}",
    r"\boxed{\sin(10^{10^{10}})}",
    r"\boxed{x^{10^{18}} + (x+1)^{10^{9}}}",
    r"\boxed{1e99999999}",
    r"\boxed{\frac{1}{10^{-10^{9}}}}",
    r"\boxed{\sqrt[10^{9}]{2}}",
    r"\boxed{2^{1/10^{9}}}",
    "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
    "\\boxed{" + "\\sqrt{" * 150 + "2" + "}" * 150 + "}",
    "\\boxed{" + "\\frac{1}{" * 120 + "2" + "}" * 120 + "}",
    "\\boxed{" + "2^{" * 100 + "2" + "}" * 100 + "}",
    "\\boxed{" + "x" * 999 + "}",
    "\\boxed{" + "1" * 999 + "}",
    "\\boxed{" + "|" * 500 + "}",
    "\\boxed{" * 2000,
    "x" * 200_000 + "\\boxed{3}",
    "\\boxed{" + "{" * 5000 + "}" * 5000 + "}",
    "The answer is " + "9^" * 400 + "9",
])
def test_hostile_inputs_are_fast(response):
    for gold in ("1", "0", "x", "3"):
        t0 = time.perf_counter()
        assert score(response, gold) in (0.0, 1.0)
        assert time.perf_counter() - t0 < 1.0, (response[:60], gold)


def test_import_is_light():
    """`import reward` pulls neither torch nor vLLM, and not even sympy until the verifier is used."""
    code = ("import sys, reward; from reward import RewardRunner, RewardSpec, resolve;"
            "bad = [m for m in ('torch', 'vllm', 'sympy') if m in sys.modules]; assert not bad, bad;"
            "from reward import score; import reward.math_answer;"
            "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]; assert not bad, bad")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_reward_modules_import_each_other_without_a_cycle():
    """Every `from reward.X import` / `import reward.X` in reward/*.py, at module level or inside a function, as a
    graph: it has no cycle (registry.py is imported by pool.py and runner.py, and imports neither)."""
    src = Path(__file__).resolve().parents[2] / "reward"
    graph = {}
    for path in sorted(src.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "reward" else [f"reward.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n.split(".")[1] for n in names if n.startswith("reward.") and (src / f"{n.split('.')[1]}.py").exists()}
        graph[path.stem] = deps - {path.stem}
    assert graph["pool"] >= {"registry"} and "pool" not in graph["registry"]

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for dep in sorted(graph.get(node, ())):
            found = cycle_from(dep, stack + [node])
            if found:
                return found
        return None

    cycles = [c for c in (cycle_from(m, []) for m in graph if m != "__init__") if c]
    assert not cycles, " -> ".join(cycles[0])
