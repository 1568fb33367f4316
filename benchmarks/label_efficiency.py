"""Label efficiency: NMAD against the number of training labels, pretrained vs the yardsticks.

Runs :mod:`bench_accuracy` once per ``--fractions`` value (its ``--label-fraction``: that share of the
train split's labels kept, every star still in the store for pretraining; with
``pretrain.label_targets`` pretraining too sees only the kept labels), then writes a Markdown table
and a figure (one panel per label; pretrained, from scratch, the MLP ensemble and the trees, solid
with XP, dashed without) from the runs' lines of ``--workdir/results.jsonl``. Every other argument
goes to bench_accuracy as it is:

    python benchmarks/label_efficiency.py --workdir /tmp/msa-acc --fractions 0.05 0.1 0.25 1 \\
        --out docs/label_efficiency.png -- --seeds 0 --threads 1 --set pretrain.label_targets=[teff,logg,fe_h,alpha_m]

``--plot-only`` redraws from results.jsonl without training (the runs with ``--tag``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy  # noqa: E402

from msa.config import load_config  # noqa: E402

CURVES = (("model", "pretrained"), ("from_scratch", "from scratch"), ("mlp", "MLP ensemble"), ("gbt", "trees"))
LABEL_TEXT = {"teff": r"$T_\mathrm{eff}$ / K", "logg": r"$\log g$", "fe_h": "[Fe/H]", "alpha_m": r"[$\alpha$/M]"}


def train_label_counts(config_path: str, overrides: list[str], fractions) -> dict[float, int]:
    """The number of train-split labels each fraction keeps (what the x axis shows)."""
    config = bench_accuracy.with_overrides(load_config(config_path), overrides)
    counts = {}
    for f in fractions:
        _, split, kept = bench_accuracy.kept_train_labels(config, f)
        counts[f] = int(((split == "train") & kept).sum())
    return counts


def latest_runs(results: Path, tag: str, fractions) -> dict[float, dict]:
    """The newest results.jsonl line of each fraction under ``tag``."""
    runs = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row.get("tag") == f"{tag}-f{row.get('label_fraction'):g}" and row["label_fraction"] in fractions:
            runs[row["label_fraction"]] = row
    missing = sorted(set(fractions) - set(runs))
    if missing:
        raise SystemExit(f"{results}: no run tagged {tag}-f<fraction> for fractions {missing}; run without --plot-only")
    return runs


def table_lines(runs: dict[float, dict], counts: dict[float, int], names) -> list[str]:
    head = "| train labels | view | " + " | ".join(f"{c[1]}" for c in CURVES) + " |"
    lines = [f"NMAD per label ({', '.join(names)}), {next(iter(runs.values()))['split']} split, "
             f"median over seeds {next(iter(runs.values()))['seeds']}", head, "|---|---|" + "---|" * len(CURVES)]
    for f in sorted(runs):
        summary = runs[f]["summary"]
        for suffix, view in (("", "XP"), ("_no_xp", "no XP")):
            cells = [" / ".join(f"{summary[v + suffix][n]:.3g}" for n in names) if v + suffix in summary else "–"
                     for v, _ in CURVES]
            lines.append(f"| {counts[f]} ({f:g}) | {view} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: dict[float, dict], counts: dict[float, int], names, out: Path) -> None:
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), constrained_layout=True)
    fractions = sorted(runs)
    x = [counts[f] for f in fractions]
    for ax, name in zip(axes, names):
        for k, (variant, text) in enumerate(CURVES):
            for suffix, style in (("", "-"), ("_no_xp", "--")):
                key = variant + suffix
                if all(key in runs[f]["summary"] for f in fractions):
                    ax.plot(x, [runs[f]["summary"][key][name] for f in fractions], style, marker="o", ms=3,
                            color=f"C{k}", label=f"{text}{' (no XP)' if suffix else ''}")
        ax.set_xscale("log")
        ax.set_xticks(x, [str(n) for n in x])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training labels")
        ax.set_ylabel(f"NMAD of {LABEL_TEXT.get(name, name)}")
    axes[0].legend(fontsize=7)
    fig.suptitle("Label efficiency: NMAD against the number of training labels")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/msa-bench-accuracy")
    p.add_argument("--config", default=str(bench_accuracy.REPO / "config" / "config.yaml"))
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0])
    p.add_argument("--tag", default="efficiency")
    p.add_argument("--out", default="label_efficiency.png", help="the figure; the table goes beside it (.md)")
    p.add_argument("--plot-only", action="store_true")
    args, bench_args = p.parse_known_args(argv)
    bench_args = [a for a in bench_args if a != "--"]
    overrides = [bench_args[i + 1] for i, a in enumerate(bench_args) if a == "--set"]
    if not args.plot_only:
        for f in args.fractions:
            bench_accuracy.main(["--workdir", args.workdir, "--config", args.config, "--label-fraction", f"{f:g}",
                                 "--tag", f"{args.tag}-f{f:g}", *bench_args])
    runs = latest_runs(Path(args.workdir) / "results.jsonl", args.tag, args.fractions)
    names = list(next(iter(runs.values()))["summary"]["model"])
    counts = train_label_counts(args.config, overrides, args.fractions)
    out = Path(args.out)
    plot(runs, counts, names, out)
    lines = table_lines(runs, counts, names)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
