"""b. All linear layers vs attention only (also at about matched parameters, rank 3) vs MLP only, each at its
best LR.  python experiments/b_where/run.py [--smoke]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from page import edge_note, fmt_best, parse_args, relation, run_cells, write_page

HERE = Path(__file__).resolve().parent
# the shared cells (experiments/cells/) this question reads: name there -> name here
NAMES = {"rank1": "all", "attention": "attention", "attention-r3": "attention-r3", "mlp": "mlp"}
VARIANTS = ("all", "attention", "attention-r3", "mlp")


def finding(r: dict) -> str:
    ranked = sorted((v for v in VARIANTS if v in r["best"]), key=lambda v: -r["best"][v]["mean"])
    return (f"Best cells: {'; '.join(fmt_best(r, v) for v in VARIANTS)}. Order by mean: {' > '.join(ranked)}. "
            f"All vs attention-only: {relation(r, 'all', 'attention')}; all vs attention "
            f"rank 3 (1.13x all's parameters): {relation(r, 'all', 'attention-r3')}. The "
            "paper finds attention-only worse even at matched parameters, and MLP-only close to all layers; "
            + ("these seeds agree where the intervals are separated in that direction, and cannot tell where they "
               "overlap." if ranked else "no result.")
            + "".join(edge_note(r, v) for v in VARIANTS if v in r["best"]))


if __name__ == "__main__":
    args = parse_args()
    r, seconds, cmds = run_cells(NAMES, args.overrides, args.smoke, args.read_only, args.retrain)
    write_page(HERE, "b. Where to put the adapter: all layers, attention, MLP",
               "All linear layers vs attention-only (also at about the parameter count of all layers, via rank 3) vs "
               "MLP-only, each at its own best LR.",
               "Attention-only learns slower and ends worse, not explained by parameter count alone; MLP layers carry "
               "most of the benefit.", [("", r)], finding(r), seconds, cmds, args.smoke)
