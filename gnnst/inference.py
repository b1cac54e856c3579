"""Prediction for unseen slides: a trained checkpoint plus an H&E image and spot coordinates, no expression.

The checkpoint carries everything needed (encoder name and identity, patch size in µm, gene panel,
graph parameters, normalisation, target scaling); a mismatch is an error, not a silent wrong answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import __version__, keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

    from gnnst.data.encoders import PatchEncoder

CKPT_KEYS = ("model_state", "model_name", "model_cfg", "in_dim", "panel", "scaler", "encoder", "patch_size_um", "graph")


def load_checkpoint(path: str | Path) -> dict:
    """Read a ``model.pt`` written by ``gnnst train``; unreadable or incomplete files raise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise GnnstError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise GnnstError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict):
        raise GnnstError(f"{path}: not a gnnst checkpoint (got {type(ck).__name__})")
    missing = [k for k in CKPT_KEYS if k not in ck]
    if missing:
        raise GnnstError(f"{path}: not a gnnst model checkpoint (key '{missing[0]}' missing); "
                         "use the model.pt that `gnnst train` writes in OUT/folds/<fold>/")
    check_checkpoint(ck, path)
    return ck


def check_checkpoint(ck: dict, path: str | Path) -> None:
    """Raise when the parts of a checkpoint disagree (gene panel, normalisation, model, encoder width)."""
    genes = list(ck["panel"].get("genes", []))
    if not genes or len(set(genes)) != len(genes):
        raise GnnstError(f"{path}: the gene panel ('panel.genes') is empty or lists a gene twice")
    for part in ("mean", "std"):
        n = len(ck["scaler"].get(part, []))
        if n != len(genes):
            raise GnnstError(f"{path}: 'scaler.{part}' has {n} values for a panel of {len(genes)} genes")
    for kind in ("heg", "hvg"):
        extra = [g for g in ck["panel"].get(kind, []) if g not in set(genes)]
        if extra:
            raise GnnstError(f"{path}: 'panel.{kind}' gene '{extra[0]}' is not in the panel")
    if int(ck["encoder"].get("dim", ck["in_dim"])) != int(ck["in_dim"]):
        raise GnnstError(f"{path}: encoder width {ck['encoder'].get('dim')} != model input width {ck['in_dim']}")
    if not float(ck["patch_size_um"]) > 0:
        raise GnnstError(f"{path}: 'patch_size_um' must be > 0, got {ck['patch_size_um']}")


def encoder_for_checkpoint(ck: dict, device) -> "PatchEncoder":
    """The checkpoint's patch encoder on ``device``; an encoder that differs from the training one raises."""
    from gnnst.data.encoders import create_encoder

    enc = create_encoder(ck["encoder"]["name"]).to(device)
    if enc.identity != ck["encoder"]["identity"] or enc.dim != ck["in_dim"]:
        raise GnnstError(f"encoder mismatch: the checkpoint was trained on '{ck['encoder']['identity']}' "
                         f"embeddings (width {ck['in_dim']}), this machine's encoder is '{enc.identity}' "
                         f"(width {enc.dim})")
    return enc


def models_from_checkpoint(ck: dict) -> list:
    """The checkpoint's ensemble members, in eval mode."""
    from gnnst.config import _from_dict
    from gnnst.models import create_model
    from gnnst.models.config import ModelConfig

    mcfg = _from_dict(ModelConfig, ck["model_cfg"], prefix="model.")
    models = []
    for state in ck.get("model_states") or [ck["model_state"]]:
        model = create_model(ck["model_name"], in_dim=ck["in_dim"], num_genes=len(ck["panel"]["genes"]), cfg=mcfg)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # shapes disagree: another panel size or embedding width
            raise GnnstError(f"checkpoint: the model weights do not fit a panel of {len(ck['panel']['genes'])} "
                             f"genes and input width {ck['in_dim']} ({str(e).splitlines()[-1].strip()})") from None
        models.append(model.eval())
    return models


def read_spot_table(path: str | Path, *, slide_id: str) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Spot table -> (pixel ``[N, 2]``, barcodes, array coordinates ``[N, 2]`` or None).

    Accepts CSV or TSV with ``pixel_x, pixel_y`` (and optionally legacy-ST array ``x, y`` and
    ``selected``), or just ``x, y`` in pixels; an optional ``barcode`` column names the spots.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise GnnstError(f"spot table not found: {path}")
    try:
        t = pd.read_csv(path, sep=None, engine="python")
    except Exception as e:
        raise GnnstError(f"{path}: cannot read the spot table ({type(e).__name__}: {e})") from None
    if "selected" in t.columns:
        t = t[t["selected"] == 1]
    arr = None
    if {"pixel_x", "pixel_y"} <= set(t.columns):
        xy = t[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
        if {"x", "y"} <= set(t.columns):
            arr = t[["x", "y"]].to_numpy(dtype=np.float64)
    elif {"x", "y"} <= set(t.columns):
        xy = t[["x", "y"]].to_numpy(dtype=np.float64)
    else:
        raise GnnstError(f"{path}: spot table needs columns 'pixel_x, pixel_y' or 'x, y' (has {list(t.columns)})")
    if "barcode" in t.columns:
        bc = t["barcode"].astype(str).tolist()
    elif arr is not None:
        bc = [f"{int(a)}x{int(b)}" for a, b in arr]
    else:
        bc = [f"spot{i}" for i in range(len(t))]
    if len(xy) == 0:
        raise GnnstError(f"{path}: no spots in the spot table of slide '{slide_id}'")
    if not np.isfinite(xy).all():
        raise GnnstError(f"{path}: spot '{bc[int(np.where(~np.isfinite(xy).all(1))[0][0])]}' has a NaN coordinate")
    if len(set(bc)) != len(bc):
        raise GnnstError(f"{path}: duplicate spot barcode in the spot table")
    return xy, bc, arr


def predict_slide(
    ck: dict,
    image: str | Path,
    pixel_xy: np.ndarray,
    barcodes: list[str],
    *,
    slide_id: str,
    mpp: float,
    cache_dir: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> "AnnData":
    """Predicted expression of one unseen slide as AnnData.

    Sets ``X`` and ``layers['gnnst_pred']`` ``[N, G]`` (normalised log expression, panel order),
    ``obsm['spatial']`` (pixels), ``obsm['X_img_<encoder>']``, ``obsp['spatial_connectivities']`` and
    ``obsp['spatial_distances']`` (the gnnst graph), ``uns['spatial_neighbors']`` and ``uns['gnnst']``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from gnnst.data.embeddings import embed_spots
    from gnnst.data.encoders import resolve_device
    from gnnst.data.manifest import cache_root
    from gnnst.graph.dataset import slide_to_data

    dev = resolve_device(device)
    enc = encoder_for_checkpoint(ck, dev)
    a = ad.AnnData(X=sp.csr_matrix((len(barcodes), 0), dtype=np.float32),
                   obs=pd.DataFrame(index=pd.Index(barcodes, name=keys.BARCODE)))
    a.obsm[keys.SPATIAL] = np.asarray(pixel_xy, dtype=np.float64)
    a.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * len(barcodes))
    a.uns[keys.UNS_GNNST] = {keys.MPP: float(mpp), keys.IMAGE_PATH: str(image)}
    emb = embed_spots(a, enc, size_um=ck["patch_size_um"], batch_size=batch_size, device=dev,
                      cache_dir=cache_root(cache_dir) / "embeddings", progress=progress)
    g = slide_to_data(a, emb, None, k=ck["graph"]["k"], radius_um=ck["graph"]["radius_um"])
    return predict_graph_to_anndata(ck, g, a, emb, device=dev)


def predict_graph_to_anndata(ck: dict, g, a: "AnnData", emb: np.ndarray, *, device) -> "AnnData":
    """Run the checkpoint's model on graph ``g`` and package the result (see :func:`predict_slide`)."""
    import anndata as ad
    import pandas as pd

    from gnnst.export.anndata import add_spatial_graph
    from gnnst.train.crossval import TargetScaler
    from gnnst.train.trainer import predict_graphs

    if g.x.shape[1] != ck["in_dim"]:
        raise GnnstError(f"embedding width mismatch: graph has {g.x.shape[1]}, checkpoint expects {ck['in_dim']}")
    tr = ck.get("train", {})
    kw = dict(batch_nodes=tr.get("batch_nodes", 512), num_hops=tr.get("num_hops", 2), device=device)
    alpha = float(ck.get("blend_alpha", 1.0))
    preds = []
    for model in models_from_checkpoint(ck):
        model.to(device)
        (h,) = predict_graphs(model, [g], mode="head", **kw)
        if alpha < 1.0:
            (r,) = predict_graphs(model, [g], mode="retrieval", **kw)
            h = alpha * h + (1 - alpha) * r
        preds.append(h)
    p = np.mean(preds, axis=0)  # [N, G] standardised
    p = TargetScaler.from_dict(ck["scaler"]).inverse(p).astype(np.float32)
    genes = ck["panel"]["genes"]
    out = ad.AnnData(X=p, obs=a.obs.copy(), var=pd.DataFrame(index=genes))
    out.layers[keys.PRED] = p.copy()
    out.obsm[keys.SPATIAL] = a.obsm[keys.SPATIAL]
    enc_key = "".join(c if c.isalnum() or c in "-_" else "_" for c in ck["encoder"]["name"])
    out.obsm[keys.img_key(enc_key)] = emb.astype(np.float32)
    add_spatial_graph(out, g.edge_index.numpy(), g.edge_attr[:, 2].numpy(), k=ck["graph"]["k"],
                      radius_um=ck["graph"]["radius_um"])
    out.uns[keys.UNS_GNNST] = {"version": __version__, keys.MPP: a.uns[keys.UNS_GNNST][keys.MPP],
                               keys.IMAGE_PATH: a.uns[keys.UNS_GNNST].get(keys.IMAGE_PATH),
                               "encoder": ck["encoder"]["name"], "fold": str(ck.get("fold", {}).get("name", "")),
                               "X": "predicted normalize_total + log1p expression"}
    return out
