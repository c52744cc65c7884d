"""d. LoRA+ (lr_B = 16 lr_A) vs plain LoRA, each at its best LR.  python experiments/d_loraplus/run.py [--smoke]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from page import best, edge_note, fmt_best, overlap, parse_args, run_cells, write_page

HERE = Path(__file__).resolve().parent
# the shared cells (experiments/cells/) this question reads: name there -> name here
NAMES = {"rank1": "plain", "loraplus16": "loraplus16"}


def finding(r: dict) -> str:
    p, q = best(r, "plain"), best(r, "loraplus16")
    if not (p and q):
        return "No result."
    shift = q["lr"] / p["lr"]
    return (f"Best cells: {fmt_best(r, 'plain')}; {fmt_best(r, 'loraplus16')}. LoRA+'s best LR is {shift:.3g}x plain's. "
            f"The best cells {'overlap: no measurable gain from LoRA+ here' if overlap(r, 'plain', 'loraplus16') else 'are separated'}"
            ". The paper's parametrisation uses one LR for A and B and found no better combination in its tuning; "
            "LoRA+ (Hayou et al.) reports faster learning with lr_B ~16 lr_A." + edge_note(r, "plain")
            + edge_note(r, "loraplus16"))


if __name__ == "__main__":
    args = parse_args()
    r, seconds, cmds = run_cells(NAMES, args.overrides, args.smoke, args.read_only, args.retrain)
    write_page(HERE, "d. LoRA+ (ratio 16) vs plain LoRA", "Does LoRA+ (lr_B = 16 lr_A) beat plain LoRA, each at its "
               "own best LR?", "One LR for A and B; no better combination was found in the paper's tuning.",
               [("", r)], finding(r), seconds, cmds, args.smoke)
