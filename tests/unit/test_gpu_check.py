"""benchmarks/gpu_check.py's CPU smoke mode: the three learners run and the table is printed; the learner's
import chain (what gpu_check imports) pulls no vLLM."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_tiny_prints_one_row_per_learner(capsys):
    import gpu_check

    assert gpu_check.main(["--tiny", "--in-process"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["ours", "peft", "full"]
    trainable = {r.split("|")[1].strip(): int(r.split("|")[2].replace(",", "")) for r in rows}
    assert trainable["ours"] == trainable["peft"] < trainable["full"]  # the same rank-1 adapter in both


def test_learner_import_chain_has_no_vllm():
    code = ("import sys, rl_lora.learner.learner, rl_lora.learner.lora, rl_lora.learner.prefix, peft; "
            "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')); "
            "sys.exit(f'vllm imported: {bad[:3]}' if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
