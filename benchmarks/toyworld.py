"""T-LoRA vs LoRA in the toy worlds at matched fidelity: every method along its own training path.

    python -m benchmarks.toyworld [--worlds flat textured] [--concepts K] [--seeds S] [--lrs LR ...]
                                  [--min-ranks R ...] [--steps N] [--every N] [--jobs 2]
    python -m benchmarks.toyworld --from-log benchmarks/toyworld-points.jsonl     # tables and plot from a log
    python -m benchmarks.toyworld --quick                                          # smoke test, no result

Each (world, concept, seed) trains LoRA and T-LoRA (ortho, sig_type last, one run per Rmin) at rank R and
every lr, scoring a checkpoint every --every steps (T-LoRA also with the mask off); the base model is every
path's step 0. Every scored point goes to the log (JSON lines); the report (markdown) and the plot (PNG) are
computed from the log alone: text alignment at matched shape-IoU levels on each method's upper envelope
(research.toyworld.tradeoff), mean ± sd over concepts × seeds.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEVELS = (0.3, 0.4, 0.5, 0.6)
READING = "<!-- reading: kept when the report is rewritten -->"


def read_log(path: Path):
    """(header dict, list of point dicts) from a log written by :func:`write_log`."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[0], lines[1:]


def write_log(path: Path, header: dict, points: list) -> None:
    tmp = Path(path).with_suffix(".partial")
    tmp.write_text("\n".join(json.dumps(x, sort_keys=True) for x in [header] + points) + "\n")
    tmp.replace(path)


def method_order(points) -> list:
    """LoRA, then T-LoRA by Rmin, each masked method followed by its no-mask sampling."""
    names = {p["method"] for p in points} - {"base"}
    rmin = lambda m: int(m.split("Rmin ")[1].split()[0]) if "Rmin " in m else -1   # noqa: E731
    return sorted(names, key=lambda m: (rmin(m), "(no mask)" in m))


def curves(points) -> dict:
    """{(world, method): [envelope per (concept, seed)]}, each path starting at its base point."""
    from research.toyworld.tradeoff import upper_envelope
    base = {(p["world"], p["concept"], p["seed"]): (p["shape_iou"], p["text_alignment"])
            for p in points if p["method"] == "base"}
    groups = defaultdict(list)
    for p in points:
        if p["method"] != "base":
            groups[(p["world"], p["method"], p["concept"], p["seed"])].append((p["shape_iou"], p["text_alignment"]))
    out = defaultdict(list)
    for (w, m, c, s), pts in sorted(groups.items()):
        out[(w, m)].append(upper_envelope(pts + [base[(w, c, s)]]))
    return out


def _mean_sd(vals) -> str:
    if not vals:
        return "–"
    sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
    return f"{statistics.mean(vals):.2f}{sd}"


def world_tables(points, world: str, levels) -> list:
    """Markdown for one world: base row, matched-fidelity table, best-fidelity table."""
    from research.toyworld.tradeoff import matched
    pts = [p for p in points if p["world"] == world]
    methods = method_order(pts)
    cv = curves(pts)
    base = [p for p in pts if p["method"] == "base"]
    lines = [f"### {world} world", "",
             f"Base model, no adapter: text alignment {_mean_sd([p['text_alignment'] for p in base])}, shape IoU "
             f"{_mean_sd([p['shape_iou'] for p in base])}, colour distance {_mean_sd([p['colour_distance'] for p in base])}.",
             "", "| method | " + " | ".join(f"TA at IoU {lv:g}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    table = matched({m: cv[(world, m)] for m in methods}, levels)
    for m in methods:
        cells = []
        for row in table[m]:
            if row["mean"] is None:
                cells.append(f"– (0/{row['of']})")
            else:
                reach = "" if row["n"] == row["of"] else f" ({row['n']}/{row['of']})"
                sd = f" ± {row['sd']:.2f}" if row["n"] > 1 else ""
                cells.append(f"{row['mean']:.2f}{sd}{reach}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | highest shape IoU on the path | its text alignment | its colour distance |",
              "|---|---|---|---|"]
    for m in methods:
        best = defaultdict(lambda: None)
        for p in pts:
            if p["method"] == m:
                k = (p["concept"], p["seed"])
                if best[k] is None or p["shape_iou"] > best[k]["shape_iou"]:
                    best[k] = p
        b = list(best.values())
        lines.append(f"| {m} | {_mean_sd([p['shape_iou'] for p in b])} | {_mean_sd([p['text_alignment'] for p in b])} | "
                     f"{_mean_sd([p['colour_distance'] for p in b])} |")
    return lines + [""]


def plot(points, path: Path, levels) -> None:
    """One panel per world: every point (faint), each method's mean envelope (solid; no mask dashed), base."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from research.toyworld.tradeoff import mean_curve
    worlds = sorted({p["world"] for p in points})
    cv = curves(points)
    fig, axes = plt.subplots(1, len(worlds), figsize=(6.2 * len(worlds), 5.0), squeeze=False)
    grid = [i / 100 for i in range(0, 101)]
    colours = {}
    for ax, w in zip(axes[0], worlds):
        pts = [p for p in points if p["world"] == w]
        for m in method_order(pts):
            key = m.replace(" (no mask)", "")
            colour = colours.setdefault(key, f"C{len(colours)}")
            dashed = "(no mask)" in m
            mine = [p for p in pts if p["method"] == m]
            ax.scatter([p["shape_iou"] for p in mine], [p["text_alignment"] for p in mine], s=9, alpha=0.25,
                       color=colour, marker="x" if dashed else "o")
            c = mean_curve(cv[(w, m)], grid)
            if c:
                ax.plot(*zip(*c), color=colour, linestyle="--" if dashed else "-", linewidth=2, label=m)
        base = [p for p in pts if p["method"] == "base"]
        ax.scatter([p["shape_iou"] for p in base], [p["text_alignment"] for p in base], s=60, marker="*",
                   color="black", label="base model", zorder=5)
        for lv in levels:
            ax.axvline(lv, color="grey", linewidth=0.5, linestyle=":")
        ax.set(title=f"{w} world", xlabel="concept fidelity: shape IoU with the training image",
               ylabel="text alignment (share of prompts followed)", xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Each method's upper envelope over its checkpoints and learning rates (mean over runs)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def report(header: dict, points: list, levels, plot_name: str, reading: str = "") -> str:
    h = header
    lines = ["# Toy worlds: T-LoRA vs LoRA at matched fidelity", "",
             f"Command: `{h['command']}` ({h['minutes']:.1f} min on {h['machine']}). Worlds: {', '.join(h['worlds'])}; "
             f"{h['concepts']} held-out concepts × {h['seeds']} seeds; rank {h['rank']}; lr {', '.join(f'{x:g}' for x in h['lrs'])}; "
             f"{h['steps']} steps (batch 4), scored every {h['every']} steps; T-LoRA Rmin {', '.join(map(str, h['min_ranks']))} "
             f"(ortho, sig_type last); {h['prompts']} test prompts per point; DDIM 25 steps, guidance 3. "
             f"Every point: `{h['log']}`; recompute this page and the plot with "
             f"`python -m benchmarks.toyworld --from-log {h['log']}`.", "",
             "Text alignment (TA): share of images that show every fact the prompt changed (flat world: background "
             "colour and position; textured world: background colour, pattern and position — the second object is "
             "in every prompt but not counted), read from the pixels. Shape IoU: IoU of the generated object's mask with the training "
             "image's after centring both, any colour. Colour distance: RGB distance of the object's median colour "
             "to the concept's, ÷ the black–white distance (0 = exact; 1 = no object). TA at IoU f: each method's "
             "upper envelope over all its checkpoints and learning rates (base model included as step 0), read at "
             "shape IoU f, mean ± sd over concepts × seeds; (n/N): only n of N runs reach f, the mean is over them.",
             "", f"![trade-off curves]({plot_name})", ""]
    for w in h["worlds"]:
        lines += world_tables(points, w, levels)
    if h.get("quick"):
        lines += ["(--quick: a smoke test of the pipeline, not a result.)", ""]
    return "\n".join(lines) + (f"\n{READING}\n{reading}" if reading else f"\n{READING}\n")


def write_outputs(header, points, out: Path, plot_path: Path, levels) -> str:
    old = out.read_text() if out.exists() else ""
    reading = old.split(READING, 1)[1].lstrip("\n") if READING in old else ""
    plot(points, plot_path, levels)
    text = report(header, points, levels, os.path.relpath(plot_path, out.parent), reading)
    tmp = out.with_suffix(".md.partial")
    tmp.write_text(text)
    tmp.replace(out)
    return text


def _parser():
    from tlora.errors import OneLineParser
    ap = OneLineParser(prog="python -m benchmarks.toyworld", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 concept, 1 seed, rank 4, 4 steps")
    ap.add_argument("--worlds", nargs="+", choices=["flat", "textured"], default=["flat", "textured"])
    ap.add_argument("--concepts", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--min-ranks", type=int, nargs="+", default=[1, 16, 32], help="T-LoRA runs, one per Rmin")
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-3])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50, help="score a checkpoint every N steps (default 50)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--levels", type=float, nargs="+",
                    help=f"shape IoU levels of the table (default: the log's, or {' '.join(map(str, LEVELS))})")
    ap.add_argument("--jobs", type=int, default=2, help="paths side by side, one process each (default 2)")
    ap.add_argument("--out", default=str(HERE / "toyworld.md"))
    ap.add_argument("--log", default=str(HERE / "toyworld-points.jsonl"))
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "toyworld-study.png"))
    ap.add_argument("--from-log", metavar="LOG", help="only rewrite the report and plot from this log")
    return ap


def _check(ap, a) -> None:
    from research.toyworld.study import CONCEPTS
    n = min(len(v) for v in CONCEPTS.values())
    for bad, rule in [(not 1 <= a.concepts <= n, f"--concepts must be 1..{n}"),
                      (a.seeds < 1 or a.jobs < 1, "--seeds and --jobs must be at least 1"),
                      (a.rank < 1 or any(not 1 <= r <= a.rank for r in a.min_ranks), "--min-ranks must be in 1..--rank"),
                      (any(not 0 < x <= 1 for x in a.lrs), "--lrs must be in (0, 1]"),
                      (a.every < 1 or a.steps % a.every, "--steps must be a multiple of --every (at least 1)"),
                      (a.prompts < 1, "--prompts must be at least 1")]:
        if bad:
            ap.error(rule)


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if any(not 0 <= x <= 1 for x in a.levels or ()):
        ap.error("--levels must be in [0, 1]")
    if a.from_log:
        try:
            header, points = read_log(Path(a.from_log))
            curves(points)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            ap.error(f"--from-log {a.from_log}: not a readable study log ({type(e).__name__}: {e})")
        levels = a.levels or header.get("levels") or list(LEVELS)
        print(write_outputs(header, points, Path(a.out), Path(a.plot), levels))
        return 0
    if a.quick:
        a.concepts, a.seeds, a.rank, a.min_ranks, a.lrs, a.steps, a.every, a.prompts = 1, 1, 4, [1], [5e-3], 4, 2, 2
    _check(ap, a)
    a.levels = a.levels or list(LEVELS)
    import platform
    import warnings
    warnings.filterwarnings("ignore")
    from research.toyworld.study import run_study, study_runs
    from tlora.toyworld.experiment import LORA, tlora_method
    methods = [LORA] + [tlora_method(r) for r in a.min_ranks]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        runs = study_runs(a.worlds, list(range(a.concepts)), list(range(a.seeds)), methods, a.lrs, a.rank, a.steps,
                          a.every, a.prompts, tmp)
        points = [p.as_dict() for p in run_study(runs, jobs=a.jobs)]
    argv_txt = " ".join(argv if argv is not None else sys.argv[1:])
    header = {"command": f"python -m benchmarks.toyworld {argv_txt}".strip(), "minutes": (time.time() - t0) / 60,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, jobs {a.jobs}",
              "worlds": a.worlds, "concepts": a.concepts, "seeds": a.seeds, "rank": a.rank, "lrs": a.lrs,
              "steps": a.steps, "every": a.every, "min_ranks": a.min_ranks, "prompts": a.prompts, "levels": a.levels,
              "log": f"benchmarks/{Path(a.log).name}" if Path(a.log).resolve().parent == HERE else a.log, "quick": a.quick}
    write_log(Path(a.log), header, points)
    print(write_outputs(header, points, Path(a.out), Path(a.plot), a.levels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
