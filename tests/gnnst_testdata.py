"""Helpers for tests: tiny legacy-ST slides and manifests written by the tests; where the real data is."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HER2ST = Path(os.environ.get("GNNST_HER2ST", REPO.parent / "shared" / "data" / "her2st"))


def write_legacy_slide(root: Path, slide_id: str, *, grid=(4, 3), pitch_px=40.0, genes=12, seed=0,
                       image_size=(220, 180), extra_unselected=1) -> dict:
    """Write ``<id>.tsv.gz``, ``<id>_selection.tsv`` and ``<id>_HE.jpg`` in the her2st layout.

    Spots sit on a ``grid`` (nx, ny) of array coordinates starting at (2, 2), ``pitch_px`` apart;
    one extra unselected spot lies outside tissue. Returns the file names and the truth.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    nx, ny = grid
    rows, sel_lines = [], ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    ids = []
    for ax in range(2, 2 + nx):
        for ay in range(2, 2 + ny):
            px, py = 20.0 + (ax - 2) * pitch_px, 20.0 + (ay - 2) * pitch_px
            sel_lines.append(f"{ax}\t{ay}\t{ax:.3f}\t{ay:.3f}\t{px:.2f}\t{py:.2f}\t1")
            ids.append(f"{ax}x{ay}")
    for j in range(extra_unselected):
        sel_lines.append(f"{30 + j}\t30\t30\t30\t5.0\t5.0\t0")
    gene_names = [f"G{g}" for g in range(genes)]
    counts = rng.poisson(5.0, size=(len(ids), genes)).astype(int)
    counts[:, 0] += 20  # a highly expressed gene
    lines = ["\t" + "\t".join(gene_names)] + [f"{i}\t" + "\t".join(map(str, c)) for i, c in zip(ids, counts)]
    with gzip.open(root / f"{slide_id}.tsv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (root / f"{slide_id}_selection.tsv").write_text("\n".join(sel_lines) + "\n")
    img = (rng.random((image_size[1], image_size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(root / f"{slide_id}_HE.jpg", quality=90)
    return {"ids": ids, "counts": counts, "genes": gene_names, "pitch_px": pitch_px}


def write_manifest(path: Path, slides: dict[str, str], *, extra: str = "", sha: dict | None = None) -> Path:
    """A legacy-ST manifest for ``slides`` (slide id -> patient id); files relative to the data root."""
    lines = ["name: tiny", "reader: legacy_st", "scale: {pitch_um: 200}", "slides:"]
    for s, p in slides.items():
        lines += [f"  - slide_id: {s}", f"    patient_id: {p}", "    files:",
                  f"      counts: {{path: {s}.tsv.gz}}", f"      spots: {{path: {s}_selection.tsv}}",
                  f"      image: {{path: {s}_HE.jpg}}"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path
