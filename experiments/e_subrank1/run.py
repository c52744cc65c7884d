"""e. Sub-rank-1: how few trainable parameters still learn the capability task with RL (TinyLoRA).
python experiments/e_subrank1/run.py [--smoke]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from page import edge_note, fmt_best, parse_args, run_cells, write_page

HERE = Path(__file__).resolve().parent
# the shared cells (experiments/cells/) this question reads: name there -> name here
NAMES = {"rank1": "rank1", "scalars-per-module": "scalars-per-module", "scalars-per-layer": "scalars-per-layer", "scalars-13": "scalars-13"}
VARIANTS = ("rank1", "scalars-per-module", "scalars-per-layer", "scalars-13")


def finding(r: dict) -> str:
    base = (r.get("base") or {}).get("accuracy")
    above = [v for v in VARIANTS if v in r["best"] and r["best"][v]["ci95"] and base is not None
             and r["best"][v]["ci95"][0] > base]
    return (f"Best cells: {'; '.join(fmt_best(r, v) for v in VARIANTS)}; base model {base}. Variants whose best "
            f"interval lies above the base: {', '.join(above) or 'none'}. TinyLoRA reports RL gains on GSM8K with ~13 "
            "trainable parameters." + "".join(edge_note(r, v) for v in VARIANTS if v in r["best"]))


if __name__ == "__main__":
    args = parse_args()
    r, seconds, cmds = run_cells(NAMES, args.overrides, args.smoke, args.read_only, args.retrain)
    write_page(HERE, "e. Below rank 1: a few trainable scalars", "How few trainable parameters still learn the "
               "capability task with RL?", "TinyLoRA (2026): 13 trainable parameters improve GSM8K under RL, and it "
               "works only with RL (~1 bit per episode).", [("", r)], finding(r), seconds, cmds, args.smoke)
