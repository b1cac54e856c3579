"""The summary table printed after training (plain text, also valid Markdown)."""

from __future__ import annotations

COLUMNS = (("pcc_heg50_per_slide", "PCC HEG50/slide"), ("pcc_hvg50_per_slide", "PCC HVG50/slide"),
           ("pcc_all_per_slide", "PCC all/slide"), ("pcc_heg50_pooled", "PCC HEG50 pooled"),
           ("mse", "MSE"), ("mae", "MAE"))


def _row(name: str, d: dict) -> str:
    return "| " + name + " | " + " | ".join(f"{d.get(k, float('nan')):.3f}" for k, _ in COLUMNS) + " |"


def format_summary(metrics: dict) -> str:
    """Markdown table: gnnst and the ridge baseline over all folds, the patient-disjoint folds, each fold."""
    head = "| model / folds | " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    lines.append(_row("gnnst, all folds", metrics["summary"]))
    if metrics["baselines"].get("ridge"):
        lines.append(_row("ridge, all folds", metrics["baselines"]["ridge"]))
    if metrics.get("summary_patient_disjoint"):
        lines.append(_row("gnnst, patient-disjoint", metrics["summary_patient_disjoint"]))
    for f in metrics["folds"]:
        tag = " (patient-disjoint)" if f["patient_disjoint"] else ""
        lines.append(_row(f"gnnst, test {'+'.join(f['test_slides'])}{tag}", f))
        if "ridge" in f:
            lines.append(_row(f"ridge, test {'+'.join(f['test_slides'])}{tag}", f["ridge"]))
    return "\n".join(lines)
