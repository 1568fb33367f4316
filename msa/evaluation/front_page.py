"""``msa front-page``: the results table that leads the Snakemake report (``workflow/report/workflow.rst``
includes it): per label, the model's NMAD, bias and calibrated [q16, q84] coverage on the test
split, beside the NMAD of every yardstick ``metrics.json`` holds, with XP and with XP hidden, and
the catalogue's size from its summary, then its Kiel diagram and sky map, embedded in the RST (the
report is one file; Snakemake's own ``embeddedimage`` directive leaves a relative link).

Yardsticks are found, not listed: any section of ``metrics.json`` whose entry for a label has an
NMAD (``section[label]["overall"]["nmad"]``, ``section[label]["nmad"]``, or the same under
``section["test"]``) is a column, so a new one (``baseline_mlp_single``, ``probe``, …) shows up
without a change here. Sections ending in ``_no_xp`` give the XP-hidden rows.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from msa.config import load_config
from msa.data.store import atomic_path

NO_XP = "_no_xp"
NOT_YARDSTICKS = {"model", "labels", "comparison", "by_g_mag", "coverage_target"}


def nmad_of(section, label: str) -> float | None:
    """The NMAD of ``label`` in a ``metrics.json`` section, wherever that section keeps it; else None."""
    if not isinstance(section, dict):
        return None
    for holder in (section, section.get("test")):
        entry = holder.get(label) if isinstance(holder, dict) else None
        if isinstance(entry, dict):
            value = (entry.get("overall") or {}).get("nmad") if isinstance(entry.get("overall"), dict) \
                else entry.get("nmad")
            if isinstance(value, (int, float)):
                return float(value)
    return None


def yardsticks(metrics: dict, labels) -> list[str]:
    """Sections (without ``_no_xp``) that give an NMAD for some label, in file order."""
    names = []
    for key, section in metrics.items():
        base = key.removesuffix(NO_XP)
        if base in NOT_YARDSTICKS or base in names:
            continue
        if any(nmad_of(section, label) is not None for label in labels):
            names.append(base)
    return names


def _number(value, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text} {unit}".strip() if unit and unit != "dex" else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An RST grid table (docutils renders it as HTML)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "+" + "+".join("=" * (w + 2) for w in widths) + "+"

    def row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line, row(header), head, *[x for r in rows for x in (row(r), line)]])


def embedded_image(path: Path, width: str) -> str:
    """An RST image holding the PNG itself (a data URI): the report is one self-contained file."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f".. image:: data:image/png;base64,{data}\n   :alt: {Path(path).name}\n   :width: {width}\n"


def front_page(metrics: dict, summary: dict | None, label_set: str, figures=(), units: dict | None = None) -> str:
    """The RST the report's front page shows for ``label_set``, then ``figures`` (PNG paths), embedded;
    ``units``: label → unit (default: the catalogue summary's)."""
    labels = metrics["labels"]
    units = units or (summary or {}).get("units") or {}
    target = metrics.get("coverage_target", 0.68)
    names = yardsticks(metrics, labels)
    header = ["label", "view", "stars", "model NMAD", "bias", f"coverage (target {target:g})",
              *[f"{n} NMAD" for n in names]]
    rows = []
    for label in labels:
        for suffix, view in (("", "XP"), (NO_XP, "XP hidden")):
            model = (metrics.get("model" + suffix) or {}).get(label, {}).get("overall")
            if not model:
                continue
            coverage = model.get("coverage")
            rows.append([label, view, str(model.get("n", "–")), _number(model.get("nmad"), units.get(label, "")),
                         _number(model.get("bias"), units.get(label, "")),
                         "–" if coverage is None else f"{coverage:.3f}",
                         *[_number(nmad_of(metrics.get(n + suffix), label), units.get(label, "")) for n in names]])
    title = f"Results: {label_set}"
    text = [title, "-" * len(title), "",
            "Test split: NMAD (1.4826 × the median absolute deviation of Δ = predicted − true), median bias and the "
            "calibrated coverage of [q16, q84] of the model, beside the NMAD of each yardstick on the same stars "
            "(lower is better).", "", _table(header, rows), ""]
    if summary:
        text += [f"Catalogue: {summary['n_rows']:,} stars in {summary['n_partitions']} HATS partitions; "
                 f"{100 * summary['fraction_without_xp']:.1f} % predicted without XP, "
                 f"{100 * summary['fraction_flagged']:.2f} % flagged for too few inputs.", ""]
    if figures:
        text += ["Kiel diagram and sky map of the catalogue (median predicted labels):", ""]
        text += [embedded_image(f, "48%" if "kiel" in Path(f).name else "100%") for f in figures]
    return "\n".join(text)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML): the labels' units (predict.label_units)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--metrics", required=True, help="the label set's results/evaluate/<set>/metrics.json")
    parser.add_argument("--summary", help="its catalogue summary, results/catalog/<set>.summary.json")
    parser.add_argument("--figures", nargs="*", default=[], help="PNGs shown under the table (Kiel diagram, sky map)")
    parser.add_argument("--out", required=True, help="RST file the report's front page includes")


def run(args) -> int:
    units = load_config(args.config)["predict"]["label_units"]
    metrics = json.loads(Path(args.metrics).read_text())
    summary = json.loads(Path(args.summary).read_text()) if args.summary else None
    with atomic_path(args.out) as tmp:
        tmp.write_text(front_page(metrics, summary, args.label_set, args.figures, units))
    return 0
