"""Benchmark section: how far to trust gnnst's predictions, from a finished `gnnst train` run.

    python benchmarks/reliability.py --run runs/her2st/train [--slide B4] [--gene ERBB2]
                                     [--figure docs/figures/her2st_reliability_B4.png]

Reads ``RUN/metrics.json`` (written by the cross-validation: every number below was computed there, by
:mod:`gnnst.metrics` on the held-out slides, with each fold's spread scale and OOD reference fitted on its
training slides only) and ``RUN/final/model.pt``, and writes the "Reliability" section of
``benchmarks/RESULTS.md`` and ``benchmarks/results/reliability.json``: per held-out slide the Spearman
correlation of |error| and ensemble sd, the coverage of the calibrated interval, its half-width and the
fraction of spots flagged out of distribution; the final model's genes passing the reliability
threshold; the per-slide PCC figures of the same run beside them. With ``--figure`` it also draws one
held-out slide (measured, predicted, sd, OOD score) with :func:`gnnst.pl.prediction`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import write_section  # noqa: E402


def _f(v, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def section(metrics: dict, final_genes: dict) -> str:
    from gnnst.eval.report import format_reliability, metric_set

    rel = metrics["reliability"]
    cfg = metrics.get("config", {})
    rc = cfg.get("reliability", {})
    per_slide = {s: v for f in metrics["folds"] for s, v in f.get("per_slide", {}).items()}
    lines = [f"Run: {metrics.get('model')} with the default config ({cfg.get('train', {}).get('ensemble')} members "
             f"per fold), protocol {metrics.get('protocol')}; each fold's spread scale fitted on the validation "
             f"blocks of its training slides (nominal {rc.get('interval_level')}), its OOD reference built from "
             f"its training slides' embeddings (k {rc.get('ood_k')}, flag above the {rc.get('ood_quantile')} "
             f"quantile of their leave-one-slide-out scores); held-out expression used only to score.", ""]
    lines += format_reliability({**rel, "final_model_genes": final_genes})
    label = metric_set(metrics).label("pcc_heg_per_slide")
    lines += ["", f"Accuracy of the same run (unchanged by the reliability outputs): {label} "
              f"{_f(metrics['summary'].get('pcc_heg_per_slide'))} over all folds, "
              + ", ".join(f"{s} {_f(v.get('pcc_heg'))}" for s, v in per_slide.items()) + "."]
    scales = ", ".join(f"{k} {_f(v)}" for k, v in rel.get("spread_scale", {}).items())
    lines += ["", f"Spread scale per fold (the one factor on the members' sd): {scales}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished `gnnst train --out` folder")
    p.add_argument("--slide", default="B4", help="held-out slide drawn with --figure")
    p.add_argument("--gene", default="ERBB2", help="gene drawn with --figure")
    p.add_argument("--figure", default=None, help="PNG of the slide: measured, predicted, sd, OOD score")
    args = p.parse_args(argv)
    from gnnst.eval.run import read_run_metrics, slide_from_run
    from gnnst.predictor import TrainedModel

    run = Path(args.run)
    metrics = read_run_metrics(run)
    if "reliability" not in metrics:
        raise SystemExit(f"{run}/metrics.json has no 'reliability' block: train it with this gnnst")
    final = TrainedModel.load(run / "final" / "model.pt").gene_reliability().summary()
    final_genes = {k: v for k, v in final.items() if k != "definition"}
    body = section(metrics, final_genes)
    write_section("reliability", "Reliability: calibration of the ensemble spread, OOD flags, reliable genes "
                                 "(`benchmarks/reliability.py`)", body)
    out = HERE / "results" / "reliability.json"
    out.write_text(json.dumps({"reliability": metrics["reliability"], "final_model_genes": final_genes,
                               "run": str(run)}, indent=1))
    print(body)
    if args.figure:
        import gnnst

        a = slide_from_run(run, args.slide, max_side=1200)
        gnnst.pl.prediction(a, args.gene, panel_size=3.0, save=args.figure, dpi=80)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
