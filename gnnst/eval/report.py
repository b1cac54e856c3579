"""The summary table printed after training (plain text, also valid Markdown); columns, labels and
definitions from :mod:`gnnst.metrics`."""

from __future__ import annotations

import math

from gnnst.metrics import SUMMARY_COLUMNS, MetricSet


def metric_set(metrics: dict) -> MetricSet:
    """The :class:`MetricSet` a run's ``metrics.json`` was computed with (from its config)."""
    ev = metrics.get("config", {}).get("eval", {})
    return MetricSet(n_heg=int(ev.get("n_heg", 50)), n_hvg=int(ev.get("n_hvg", 50)), hvg=str(ev.get("hvg", "seurat")))


def _f(v) -> str:
    return "–" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.3f}"


def table_header(ms: MetricSet, columns=SUMMARY_COLUMNS, first: str = "model / folds") -> list[str]:
    """The two header lines of a Markdown table of ``columns``."""
    return ["| " + first + " | " + " | ".join(ms.label(k) for k in columns) + " |", "|" + "---|" * (len(columns) + 1)]


def table_row(name: str, d: dict, columns=SUMMARY_COLUMNS) -> str:
    return "| " + name + " | " + " | ".join(_f(d.get(k)) for k in columns) + " |"


def format_summary(metrics: dict) -> str:
    """Markdown table: the model and each baseline over all folds, over the patient-disjoint folds and per
    fold; then the definitions of the columns. A LEAKY run says so above the table."""
    from gnnst.eval.baselines import LABELS

    ms = metric_set(metrics)
    name = metrics.get("model") or "model"
    baselines = metrics.get("baselines", {})
    lines = []
    if metrics.get("protocol", "honest") != "honest":
        lines += [f"**{metrics['protocol']}** -- not a valid estimate", ""]
    lines += table_header(ms)
    if metrics.get("summary"):
        lines.append(table_row(f"{name}, all folds", metrics["summary"]))
    for b, d in baselines.items():
        lines.append(table_row(f"{LABELS.get(b, b)}, all folds", d))
    if metrics.get("summary_patient_disjoint"):
        lines.append(table_row(f"{name}, patient-disjoint", metrics["summary_patient_disjoint"]))
    for b, d in metrics.get("baselines_patient_disjoint", {}).items():
        if d:
            lines.append(table_row(f"{LABELS.get(b, b)}, patient-disjoint", d))
    for f in metrics["folds"]:
        tag = f"test {'+'.join(f['test_slides'])}" + (" (patient-disjoint)" if f["patient_disjoint"] else "")
        if "pcc_heg_per_slide" in f:
            lines.append(table_row(f"{name}, {tag}", f))
        for b, d in f.get("baselines", {}).items():
            lines.append(table_row(f"{LABELS.get(b, b)}, {tag}", d))
    pooled = (metrics.get("summary") or next(iter(baselines.values()), {})).get("n_genes_pooled", {})
    lines += ["", "Columns (gnnst.metrics):"]
    lines += [f"- {ms.label(k)}: {ms.definition(k)}" for k in SUMMARY_COLUMNS]
    lines += [f"- {ms.subset_label(k)}: {ms.subset_definition(k)}" for k in ("heg", "hvg")]
    if pooled:
        lines.append("- pooled over all folds on " + ", ".join(f"{n} {ms.subset_label(k)}" for k, n in pooled.items())
                     + " genes (in every fold's subset)")
    if metrics.get("reliability"):
        lines += ["", *format_reliability(metrics["reliability"])]
    return "\n".join(lines)


def format_reliability(rel: dict) -> list[str]:
    """Markdown lines of ``metrics.json['reliability']``: the spread's calibration and the OOD fraction over
    all held-out slides, the patient-disjoint ones and each slide; the final model's reliable genes."""
    from gnnst.metrics import RELIABILITY_COLUMNS

    defs = rel.get("definitions", {})
    label = {k: defs.get(k, {}).get("label", k) for k in RELIABILITY_COLUMNS}
    lines = ["Reliability (gnnst.reliability, fitted on training slides; held-out expression used for scoring only):",
             "", "| held-out slides | " + " | ".join(label[k] for k in RELIABILITY_COLUMNS) + " |",
             "|" + "---|" * (len(RELIABILITY_COLUMNS) + 1)]
    rows = [("all", rel.get("summary", {})), ("patient-disjoint", rel.get("summary_patient_disjoint", {}))]
    rows += [(s, v) for s, v in rel.get("per_slide", {}).items()]
    for name, d in rows:
        if d:
            lines.append(table_row(name, d, RELIABILITY_COLUMNS))
    genes = rel.get("final_model_genes")
    if genes:
        lines += ["", f"Final model: {genes['n_reliable']} of {genes['n_genes']} panel genes pass the reliability "
                      f"threshold (cross-validated PCC >= {genes['threshold']:g}; {genes['n_estimated']} have an estimate)"]
    lines += ["", "Columns:"] + [f"- {label[k]}: {defs.get(k, {}).get('definition', '')}" for k in RELIABILITY_COLUMNS]
    return lines
