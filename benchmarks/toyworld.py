"""T-LoRA vs LoRA in the toy world: K held-out concepts × S seeds × {LoRA, Vanilla T-LoRA, T-LoRA} × ranks.

    python -m benchmarks.toyworld [--quick] [--concepts K] [--seeds S] [--steps N] [--jobs 2] [--out benchmarks/toyworld.md]

Every run trains on one image of a concept and samples prompts that move it to other backgrounds and
positions; metrics are read from the pixels (see tlora.toyworld.experiment). ``--quick`` is a smoke test
(one concept, one seed, rank 4, few steps): it shows the pipeline runs, not a result.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

PAPER = {  # SDXL, paper Table: (IS, TS) for LoRA, Vanilla T-LoRA, T-LoRA
    4: ((.890, .250), (.894, .259), (.899, .255)),
    16: ((.900, .243), (.902, .256), (.897, .260)),
    64: ((.901, .232), (.902, .240), (.900, .256)),
}


def table(results, ranks, methods) -> list[str]:
    lines = ["| rank | method | text alignment (mean ± sd over seeds) | concept fidelity | paper IS / TS (SDXL) |",
             "|---|---|---|---|---|"]
    for r in ranks:
        for mi, m in enumerate(methods):
            rows = [x for x in results if x.rank == r and x.method == m]
            seeds = sorted({x.seed for x in rows})
            # average over concepts within a seed, then spread over seeds
            ta = [statistics.mean(x.text_alignment for x in rows if x.seed == s) for s in seeds]
            cf = [statistics.mean(x.concept_fidelity for x in rows if x.seed == s) for s in seeds]
            sd = (lambda v: f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
            paper = PAPER.get(r)
            p = f"{paper[mi][0]:.3f} / {paper[mi][1]:.3f}" if paper and mi < 3 else "-"
            lines.append(f"| {r} | {m} | {statistics.mean(ta):.2f}{sd(ta)} | {statistics.mean(cf):.2f}{sd(cf)} | {p} |")
    return lines


def main(argv=None) -> int:
    from tlora.toyworld.experiment import CONCEPTS, LR, METHODS, STEPS, TARGETS, default_model, run_grid
    from tlora.errors import OneLineParser
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concepts", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one process each (default 2)")
    ap.add_argument("--model", default=None, help="toy-world pipeline (default: the shipped one)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("toyworld.md")))
    a = ap.parse_args(argv)
    if not 1 <= a.concepts <= len(CONCEPTS) or a.seeds < 1 or a.jobs < 1:
        ap.error(f"--concepts must be 1..{len(CONCEPTS)}, --seeds and --jobs at least 1")
    if a.quick:
        a.concepts, a.seeds, a.ranks, a.steps, a.prompts = 1, 1, [4], 10, 2
    import warnings
    warnings.filterwarnings("ignore")
    methods = list(METHODS)
    t0 = time.time()
    results = run_grid(Path(a.model) if a.model else default_model(), list(range(a.concepts)), list(range(a.seeds)),
                       a.ranks, methods, a.steps, a.prompts, lr=a.lr, jobs=a.jobs)
    minutes = (time.time() - t0) / 60
    cmd = "python -m benchmarks.toyworld" + (" --quick" if a.quick else
                                               f" --concepts {a.concepts} --seeds {a.seeds} --steps {a.steps} --lr {a.lr:g} --jobs {a.jobs}")
    lines = ["# Toy world: T-LoRA vs LoRA from one image", "",
             f"Command: `{cmd}` ({minutes:.1f} min on this machine). {a.concepts} held-out concepts × {a.seeds} seeds, "
             f"{a.steps} training steps (batch 4, lr {a.lr:g}, LoRA on {' and '.join(TARGETS)} layers), {a.prompts} prompts per run that change background and "
             "position; DDIM 25 steps, guidance 3.", "",
             "Text alignment: share of images whose background colour and position, read from the pixels, match "
             "the prompt (the paper's TS, exact here). Concept fidelity: IoU of the generated object's mask with "
             "the reference object's after centring both, zero when the object has the wrong colour (the paper's "
             "IS, exact here).", ""] + table(results, a.ranks, methods)
    lines += ["", "Every run (concept index, seed, rank, method: text alignment / concept fidelity):", ""]
    lines += [f"- c{x.concept} s{x.seed} r{x.rank} {x.method}: {x.text_alignment:.2f} / {x.concept_fidelity:.2f}"
              for x in results]
    if a.quick:
        lines += ["", "(--quick: a smoke test of the pipeline, not a result.)"]
    tmp = Path(a.out).with_suffix(".md.partial")      # written whole, then renamed
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(a.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
