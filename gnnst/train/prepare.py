"""What a fit needs, chosen on the training slides only: the gene panel, the graphs, the validation
blocks and the target scaling (:func:`prepare_training`, shared by the cross-validation folds and the
final model).

Honest protocol (default): the panel and the target standardisation come from the training spots;
validation blocks (early stopping, checkpoint, blend weight) are carved from the training slides; the
held-out slides are only predicted. With ``select_on_heldout`` (``eval.select_on_heldout``, LEAKY, for
comparison with published numbers only) the panel is chosen on all slides including the held-out ones
and the held-out slides are the validation set.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys

if TYPE_CHECKING:
    import torch
    from torch_geometric.data import Data

    from gnnst.config import Config
    from gnnst.data.expression import GenePanel
    from gnnst.graph.features import FeatureState
    from gnnst.graph.targets import TargetFolder
    from gnnst.predictor import TargetScaler

LEAKY = ("LEAKY (eval.select_on_heldout): gene panel and reported subsets chosen on all slides including "
         "the held-out one; early stopping, checkpoint, blend and the spread's scale chosen on the held-out slide")


def carve_validation(graphs: Sequence["Data"], fraction: float, seed: int) -> list[np.ndarray]:
    """Per training slide, a ``[N]`` bool mask of validation spots: whole spatial blocks, about
    ``fraction`` of each slide, so validation spots are not surrounded by training spots."""
    from gnnst.graph.sampler import spatial_tiles

    rng = np.random.default_rng(seed)
    masks = []
    for g in graphs:
        n = g.num_nodes
        mask = np.zeros(n, dtype=bool)
        if fraction > 0 and n >= 8:
            tiles = spatial_tiles(g.pos.numpy(), max(int(math.ceil(n * fraction / 2)), 1))
            for t in rng.permutation(len(tiles)):
                if mask.sum() >= fraction * n:
                    break
                mask[tiles[t]] = True
        masks.append(mask)
    return masks


def scored_validation(masks: Sequence[np.ndarray], limit: int | None, seed: int) -> list[np.ndarray]:
    """The validation spots that are scored (``train.val_spots``): ``masks`` (``[N]`` bool per slide) as they
    are while they hold at most ``limit`` spots (or ``limit`` is ``None``), else a uniform sample of ``limit``
    of their spots over all slides (seeded with ``seed``). The spots left out are still not trained on."""
    from gnnst.sampling import sample_masks

    picked = sample_masks(masks, limit, [seed, 1])
    return [np.asarray(m, dtype=bool) for m in masks] if picked is None else picked


def node_subgraph(g: "Data", keep: np.ndarray) -> "Data":
    """The graph restricted to nodes ``keep`` ``[N]`` bool (edges among them only)."""
    import torch
    from torch_geometric.data import Data

    k = torch.from_numpy(keep)
    remap = torch.full((g.num_nodes,), -1, dtype=torch.long)
    remap[k] = torch.arange(int(k.sum()))
    src, dst = g.edge_index
    e = k[src] & k[dst]
    out = Data(x=g.x[k], pos=g.pos[k], edge_index=remap[g.edge_index[:, e]], edge_attr=g.edge_attr[e],
               num_nodes=int(k.sum()))
    if getattr(g, "y", None) is not None:
        out.y = g.y[k]
    views = getattr(g, keys.DATA_X_VIEWS, None)
    if views is not None:  # [V, N, D] -> [V, n, D]
        setattr(out, keys.DATA_X_VIEWS, views[:, k])
    return out


def with_node_mask(g: "Data", keep: np.ndarray) -> "Data":
    """``g`` restricted to nodes ``keep`` ``[N]`` bool without copying it: a shallow copy with
    ``node_mask`` set, which the samplers and the models' ``after_fit`` honour exactly as they would the
    copy :func:`node_subgraph` makes (the other nodes are neither centres, nor halo, nor in a bank)."""
    import torch

    d = copy.copy(g)
    d.node_mask = torch.from_numpy(np.asarray(keep, dtype=bool))
    return d


def scaled(g: "Data", scaler: "TargetScaler", targets: "TargetFolder | None" = None) -> "Data":
    """``g`` with ``y`` ``[N, G]`` standardised by ``scaler``; shares x, pos and the edges with ``g`` (a clone
    would double a large slide); the storage dtype of ``y`` is kept. ``targets``: the new ``y`` is held
    file-backed there, and ``g.y``'s pages, if held there, are released once read (a pass over a cohort keeps
    one slide resident); ``None``: in memory."""
    import torch

    d = copy.copy(g)
    y = g.y.numpy()
    z = scaler.transform(y).astype(y.dtype)
    if targets is None:
        d.y = torch.from_numpy(z)
    else:
        d.y = targets.hold(z)
        targets.release(g.y)
    return d


def fit_scaler(graphs: Sequence["Data"], masks: Sequence[np.ndarray] | None = None,
               targets: "TargetFolder | None" = None) -> "TargetScaler":
    """The standardisation of the ``y`` ``[N_i, G]`` of ``graphs`` (rows ``masks[i]`` ``[N_i]`` bool of each,
    default all): :meth:`TargetScaler.fit` of their rows concatenated, bit for bit, without concatenating
    them (:meth:`TargetScaler.fit_parts`); with ``targets``, each slide's pages are released once read."""
    from gnnst.predictor import TargetScaler

    def parts():
        for i, g in enumerate(graphs):
            y = g.y.numpy()
            yield y if masks is None else y[masks[i]]
            if targets is not None:
                targets.release(g.y)

    return TargetScaler.fit_parts(parts)


@dataclass
class TrainingSet:
    """The inputs of one fit (see :func:`prepare_training`).

    Attributes:
        panel: the gene panel (columns of every ``y``).
        graphs: slide id -> graph of every training and test slide, normalised expression (unscaled; every
            ``y`` here and below is file-backed, :class:`gnnst.graph.targets.TargetFolder`), ``x``
            the embeddings before :attr:`feature_norm` (what :meth:`TrainedModel.predict` takes).
        train_slides, test_slides: the slides.
        train: training parts of the training slides, ``y`` standardised, ``x`` the model's input (and
            ``x_views`` with ``features.stain_augment``): the slides' graphs with ``node_mask`` marking the
            training spots (:func:`with_node_mask`; shallow copies, so an epoch's views never reach ``val``).
        val: graphs whose ``val_masks`` spots are scored for validation, ``y`` standardised, ``x`` the model's input.
        val_masks: ``[N]`` bool per ``val`` graph: the scored validation spots (at most ``train.val_spots``).
        scaler: the standardisation (training spots only).
        feature_norm: what turns a graph's ``x`` into the model's input (:class:`gnnst.graph.features.FeatureState`).
        inputs: slide id -> :attr:`graphs` with ``x`` the model's input (unscaled ``y``).
        protocol: ``"honest"`` or :data:`LEAKY`.
    """

    panel: "GenePanel"
    graphs: dict
    train_slides: list[str]
    test_slides: list[str]
    train: list
    val: list
    val_masks: list[np.ndarray]
    scaler: "TargetScaler"
    feature_norm: "FeatureState"
    inputs: dict
    protocol: str = "honest"

    @property
    def train_full(self) -> list:
        """The whole training slides (validation spots included), unscaled, ``x`` the model's input."""
        return [self.inputs[s] for s in self.train_slides]

    @property
    def in_dim(self) -> int:
        return int(self.train[0].x.shape[1])


def prepare_training(cfg: "Config", source, train_slides: Sequence[str], test_slides: Sequence[str], *,
                     select_on_heldout: bool = False) -> TrainingSet:
    """What a fit needs, from ``train_slides`` only (unless ``select_on_heldout``, see the module docstring).

    ``source``: the slides (:class:`gnnst.graph.store.SlideSource`: a graph folder, or slides read and
    embedded in memory); the panel, targets and scaling are the same from either.

    Every ``y`` of the result (normalised and standardised, ``[N, G]`` per slide) is file-backed in a
    fold-private :class:`gnnst.graph.targets.TargetFolder` (``$TMPDIR``), so the fold's targets are paged by
    the operating system like a graph folder's ``x`` instead of growing with the cohort in RAM; their values
    are those of in-memory arrays, bit for bit.
    """
    from gnnst.data.expression import select_panel
    from gnnst.graph.dataset import make_graphs
    from gnnst.graph.features import fold_features
    from gnnst.graph.targets import TargetFolder

    train_slides, test_slides = list(train_slides), list(test_slides)
    leaky = select_on_heldout and bool(test_slides)
    panel_slides = train_slides + test_slides if leaky else train_slides
    with source.timer("panel"):
        panel = select_panel([functools.partial(source.slide_counts, s) for s in panel_slides], cfg.expression)
    ff = fold_features(cfg, source, train_slides, train_slides + test_slides)  # the slides' images only
    with TargetFolder() as targets:  # y and its standardised copy file-backed: not in RAM per cohort
        graphs = make_graphs(source, cfg, panel, train_slides + test_slides, targets=targets,
                             embs=ff.embs if ff.stain_reference is not None else None)  # else: the source's own x
        return _fit_inputs(cfg, panel, graphs, ff, train_slides, test_slides, leaky, targets)


def _fit_inputs(cfg: "Config", panel: "GenePanel", graphs: dict, ff, train_slides: list[str], test_slides: list[str],
                leaky: bool, targets: "TargetFolder") -> TrainingSet:
    """:func:`prepare_training` once the fold's graphs are made: the model inputs, validation blocks and the
    standardised targets (held in ``targets``)."""
    from gnnst.graph.features import feature_state

    features = feature_state(cfg.features, (ff.embs[s] for s in train_slides), ff.stain_reference)
    inputs = {}
    for s, g in graphs.items():
        if s in ff.views:  # [V, N, D] file-backed like y: a cohort's views are not in RAM
            g = copy.copy(g)
            views = _views_tensor(ff.views[s], g.x.dtype)  # one slide's; slide_norm holds its standardised copy
            setattr(g, keys.DATA_X_VIEWS, views if features.slide_norm is not None else targets.hold(views.numpy()))
        inputs[s] = features.graph_inputs(g, hold=targets.hold)  # standardised x file-backed, as y
    train_full = [inputs[s] for s in train_slides]
    if leaky:
        val_graphs = [_without_views(inputs[s]) for s in test_slides]
        val_masks = scored_validation([np.ones(g.num_nodes, dtype=bool) for g in val_graphs], cfg.train.val_spots,
                                      cfg.seed)
        scaler = fit_scaler(train_full, targets=targets)
        train = [scaled(g, scaler, targets) for g in train_full]
        val = [scaled(g, scaler, targets) for g in val_graphs]
    else:
        val_masks, scaler, train, val = honest_targets(train_full, cfg, targets)
    return TrainingSet(panel=panel, graphs=graphs, train_slides=train_slides, test_slides=test_slides,
                       train=train, val=val, val_masks=val_masks, scaler=scaler, feature_norm=features, inputs=inputs,
                       protocol=LEAKY if leaky else "honest")


def honest_targets(train_full: Sequence["Data"], cfg: "Config", targets: "TargetFolder | None" = None
                   ) -> tuple[list[np.ndarray], "TargetScaler", list, list]:
    """The honest protocol's targets of the whole training slides ``train_full`` (normalised ``y`` ``[N, G]``):
    validation blocks carved from them (:func:`carve_validation`), the scaler fitted on the other spots
    (:func:`fit_scaler`), and one standardised ``y`` per slide (:func:`scaled`, held in ``targets``) shared by
    the training part (:func:`with_node_mask`) and the validation graph.

    Returns ``(val_masks, scaler, train, val)``: the scored validation spots, ``[N]`` bool per slide (all of
    the blocks' spots, or ``train.val_spots`` of them: :func:`scored_validation`), the scaler, the training
    graphs (without any spot of the blocks) and the validation graphs (without ``x_views``).
    """
    blocks = carve_validation(train_full, cfg.train.val_fraction, cfg.seed)
    scaler = fit_scaler(train_full, [~m for m in blocks], targets)
    full = [scaled(g, scaler, targets) for g in train_full]  # one standardised y per slide, shared by both
    val = [_without_views(g) for g in full]
    train = [with_node_mask(g, ~m) for g, m in zip(full, blocks)]
    return scored_validation(blocks, cfg.train.val_spots, cfg.seed), scaler, train, val


def _views_tensor(views: np.ndarray, dtype) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32)).to(dtype)


def _without_views(g: "Data") -> "Data":
    """``g`` without ``x_views`` (validation and prediction see view 0 only); a shallow copy."""
    d = copy.copy(g)
    if getattr(d, keys.DATA_X_VIEWS, None) is not None:
        del d[keys.DATA_X_VIEWS]
    return d
