"""The trained model: the one artefact that passes from training to prediction.

:class:`TrainedModel` holds everything prediction needs: which encoder made the embeddings (name,
identity, input size, width) and the patch size in µm, the gene panel and how expression was
normalised, the target scaling, the graph parameters, the inference batching, the ensemble members'
weights, the head/retrieval blend weight chosen on validation spots, where it was trained (the fold),
for a run's final model the per-gene cross-validated PCC of the run it came from (:attr:`cv`), what is
done to a slide's patches and embeddings before the members see them (:attr:`feature_norm`, a
:class:`~gnnst.graph.features.FeatureState`: stain reference, per-slide standardisation), and what
says how far to trust a prediction (:mod:`gnnst.reliability`): the scale of the ensemble spread fitted
on validation spots (:attr:`calibration`) and a bounded reference of training features for
out-of-distribution scores (:attr:`ood_reference`).

Cross-validation (:mod:`gnnst.eval.crossval`) builds one per fold and scores the held-out slide
through :meth:`TrainedModel.predict`, so a fold's metrics and ``gnnst predict`` run the same code;
``gnnst train`` saves them as ``OUT/folds/<fold>/model.pt`` and ``OUT/final/model.pt``. Prediction
(:mod:`gnnst.inference`), export, figures and the benchmarks only :meth:`~TrainedModel.load` it.

File format (``torch.save`` of plain data, read back with ``weights_only=True``, so loading a file
runs no code): a dict with ``format`` = :data:`FORMAT`, ``format_version`` = :data:`FORMAT_VERSION`
and the fields of :class:`TrainedModel` (configs as dicts, member weights as state dicts of tensors).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from gnnst import __version__
from gnnst.config import ExpressionConfig, GraphConfig, ModelConfig, ReliabilityConfig
from gnnst.data.expression import GenePanel
from gnnst.errors import GnnstError
from gnnst.graph.features import FeatureState
from gnnst.reliability import Calibration, GeneReliability, OODReference, ensemble_sd

if TYPE_CHECKING:
    import torch
    from torch_geometric.data import Data

    from gnnst.data.encoders import PatchEncoder
    from gnnst.graph.edges import SlideGraph
    from gnnst.models.base import ExpressionModel

FORMAT = "gnnst.TrainedModel"  # the 'format' field of a model file
FORMAT_VERSION = 1  # bumped when a field changes meaning; older files are refused with a message
OPTIONAL_FIELDS = ("cv", "calibration", "ood_reference", "reliability", "protocol", "feature_norm")  # absent from older files


@dataclass
class TargetScaler:
    """Per-gene standardisation of the normalised expression with statistics of the training spots only.

    Attributes:
        mean, std: ``[G]`` float32 (std floored at 1e-3).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, y_train: np.ndarray) -> "TargetScaler":
        """From the training spots' expression ``[N, G]`` (accumulated in float64: y may be float16)."""
        return cls(mean=y_train.mean(0, dtype=np.float64).astype(np.float32),
                   std=np.maximum(y_train.std(0, dtype=np.float64), 1e-3).astype(np.float32))

    @classmethod
    def fit_parts(cls, parts: Callable[[], Iterable[np.ndarray]], chunk_rows: int = 65536) -> "TargetScaler":
        """:meth:`fit` on the rows of several arrays without concatenating them: equal, bit for bit, to
        ``fit(np.concatenate(list(parts())))`` (checked by ``tests/test_predictor.py``), in memory bounded by
        ``chunk_rows`` rows of float64 (two passes, as numpy's ``std`` makes them).

        Args:
            parts: called twice (once per pass), each time giving the ``[N_i, G]`` arrays in order.
            chunk_rows: rows accumulated per numpy call.

        Numpy sums a C-ordered array over axis 0 row after row (the inner loop runs over the columns), so
        the running ``[G]`` float64 sum carried into the next chunk as its first row gives the same additions
        in the same order as one call on the whole array.
        """
        def running(acc, rows):  # acc [G] float64 or None; rows [n, G] float64
            return np.add.reduce(rows if acc is None else np.concatenate([acc[None], rows]), axis=0)

        def chunks():
            for y in parts():
                for a in range(0, len(y), chunk_rows):
                    yield np.asarray(y[a:a + chunk_rows], dtype=np.float64)

        acc, n = None, 0
        for rows in chunks():
            if len(rows):
                acc, n = running(acc, rows), n + len(rows)
        if acc is None:  # no rows: what fit gives (nan, with numpy's warning)
            return cls.fit(np.concatenate(list(parts())))
        mean = np.true_divide(acc, n)
        acc = None
        for rows in chunks():
            if len(rows):
                d = np.subtract(rows, mean)
                acc = running(acc, np.square(d, out=d))
        std = np.sqrt(np.true_divide(acc, n))
        return cls(mean=mean.astype(np.float32), std=np.maximum(std, 1e-3).astype(np.float32))

    def transform(self, y):
        return (y - self.mean) / self.std

    def inverse(self, z):
        return z * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetScaler":
        return cls(mean=np.asarray(d["mean"], dtype=np.float32), std=np.asarray(d["std"], dtype=np.float32))


@dataclass(frozen=True)
class EncoderInfo:
    """The patch encoder whose embeddings a model reads (``identity`` pins the weights)."""

    name: str
    identity: str
    input_size: int
    dim: int
    precision: str = "float32"  # arithmetic the embeddings were computed in (gnnst.data.encoders.PRECISIONS)
    checkpoint: str | None = None  # the local weights file it was built from (recipes, timm:<model>)
    timm_kwargs: dict | None = None  # architecture arguments of a timm:<model>

    @classmethod
    def of(cls, encoder: "PatchEncoder") -> "EncoderInfo":
        return cls.from_dict(encoder.record())

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderInfo":
        """From :meth:`PatchEncoder.record` (``LoadedSlides.encoder``) or a saved model's ``encoder``."""
        return cls(name=str(d["name"]), identity=str(d["identity"]), input_size=int(d["input_size"]),
                   dim=int(d["dim"]), precision=str(d.get("precision") or "float32"),
                   checkpoint=None if d.get("checkpoint") is None else str(d["checkpoint"]),
                   timm_kwargs=None if d.get("timm_kwargs") is None else dict(d["timm_kwargs"]))


@dataclass
class Prediction:
    """A model's prediction for one slide graph.

    Attributes:
        expression: ``[N, G]`` float32 normalised log expression (the panel's units), ensemble mean.
        members: ``[M, N, G]`` float32 each ensemble member's prediction in the same units, or ``None``
            when not asked for (their spread is the ensemble's disagreement).
        ood_score: ``[N]`` float32 out-of-distribution score of each spot (:class:`~gnnst.reliability.OODReference`),
            ``None`` when the model has no reference or it was not asked for.
        ood: ``[N]`` bool, the score above the model's threshold (``None`` with ``ood_score``).
    """

    expression: np.ndarray
    members: np.ndarray | None = None
    ood_score: np.ndarray | None = None
    ood: np.ndarray | None = None

    @property
    def sd(self) -> np.ndarray | None:
        """``[N, G]`` sd (``ddof=1``) of the members' predictions; ``None`` without members or with one."""
        return ensemble_sd(self.members)


def halo_hops(model: "ExpressionModel", num_hops: int) -> int:
    """The halo depth mini-batches of ``model`` need: ``num_hops``, or 0 for models that read no graph."""
    return num_hops if getattr(model, "uses_halo", True) else 0


def image_side(graphs: Sequence["Data"]) -> list["Data"]:
    """``graphs`` without ``y`` (shallow copies sharing ``x`` and the edges): what prediction reads."""
    out = []
    for g in graphs:
        d = copy.copy(g)
        d.y = None
        out.append(d)
    return out


def predict_graphs(model: "ExpressionModel", graphs: Sequence["Data"], *, batch_nodes: int, num_hops: int,
                   device, modes: Sequence[str | None] = (None,), loader=None,
                   masks: Sequence[np.ndarray] | None = None) -> dict:
    """Image-side predictions of one model for each graph, by halo subgraphs (any slide size).

    One pass over the mini-batches computes every mode of ``modes`` (``model.predict``'s modes; ``None``
    = its default). Returns ``{mode: [[N_s, G] float32 per graph]}`` in the units of the training ``y``.
    ``num_hops`` is the configured halo (:func:`halo_hops` drops it for models that read no graph).
    ``loader``: a sampler already made over ``image_side(graphs)`` (unshuffled; e.g. a device-resident
    one, whose predictions are gathered on the device and copied back once).
    ``masks``: ``[N_s]`` bool per graph, the only nodes predicted (``loader`` must centre its batches on
    them, as :func:`gnnst.train.trainer.validation_loader` does): the result holds ``[n_s, G]`` per graph,
    those nodes in node order, and nothing of the size of the slides is allocated.
    """
    import torch

    from gnnst.graph.sampler import SubgraphLoader

    model.eval()
    if loader is None:
        loader = SubgraphLoader(image_side(graphs), batch_nodes=batch_nodes, num_hops=halo_hops(model, num_hops),
                                centre_masks=masks)
    if masks is None:
        rows, sizes = [np.arange(g.num_nodes) for g in graphs], [g.num_nodes for g in graphs]
    else:  # node -> its row in the slide's output (only the masked nodes are ever looked up)
        rows, sizes = [np.cumsum(m) - 1 for m in masks], [int(np.count_nonzero(m)) for m in masks]
    if hasattr(loader, "iter_batches"):  # on the device: one buffer per mode, one copy back
        row_of = torch.from_numpy(np.concatenate([r + o for r, o in zip(rows, np.cumsum([0] + sizes[:-1]))]))
        row_of = row_of.to(loader.device)  # global node -> row of the buffer
        bufs = {m: torch.zeros(sum(sizes), model.num_genes, device=loader.device) for m in modes}
        with torch.no_grad():
            for b in loader:
                c = b.center_mask
                for m in modes:
                    bufs[m][row_of[b.global_node[c]]] = model.predict(b, mode=m)[c].float()
        cuts = np.cumsum(sizes)[:-1]
        return {m: np.split(bufs[m].cpu().numpy(), cuts) for m in modes}
    outs = {m: [np.zeros((n, model.num_genes), dtype=np.float32) for n in sizes] for m in modes}
    with torch.no_grad():
        for b in loader:
            b = b.to(device)
            c = b.center_mask
            sl, nid = b.slide[c].cpu().numpy(), b.node_id[c].cpu().numpy()
            for m in modes:
                p = model.predict(b, mode=m)[c].float().cpu().numpy()
                for s in np.unique(sl):
                    outs[m][s][rows[s][nid[sl == s]]] = p[sl == s]
    return outs


@dataclass
class TrainedModel:
    """Everything needed to predict expression for a new slide from its H&E (see the module docstring).

    Attributes:
        model_name: registered model name (:func:`gnnst.models.create_model`).
        model_config: its hyper-parameters.
        in_dim: embedding width ``D`` the model reads.
        encoder: the patch encoder of the embeddings (a different one is refused at prediction).
        patch_size_um: side of the patch cut around each spot, µm.
        panel: the gene panel (order of the output columns) with its HEG/HVG rankings.
        expression: how the measured expression was normalised (the units of the output).
        scaler: the standardisation the members were trained on (undone by :meth:`predict`).
        graph: ``k`` and ``radius_um`` of the spot graph.
        batch_nodes, num_hops: mini-batches at prediction (centre spots, halo depth).
        states: the ensemble members' state dicts (CPU tensors), seeds ``seed .. seed + M - 1``.
        blend_alpha: weight of the regression head (``1 - alpha`` on retrieval), chosen on the validation
            spots of the training slides; 1 = head only, 0 = retrieval only.
        fold: ``{'name', 'train_slides', 'test_slides', 'patient_disjoint'}`` (``name='final'`` for the
            model trained on every slide).
        cv: per-gene cross-validated PCC of the run the model came from, for the final model:
            ``{'genes', 'pcc_mean', 'pcc_sd', 'n_slides', 'pcc_patient_disjoint', 'definition'}`` (lists in
            panel order, ``None`` where a gene was in no fold's panel). ``None`` for a fold model: its own
            held-out slide is its estimate, in the run's ``metrics.json``, and it is written before the
            other folds finish.
        calibration: the scale of the members' spread fitted on the validation spots of the training
            slides (:class:`~gnnst.reliability.Calibration`); ``None`` for a single member.
        ood_reference: training features for out-of-distribution scores
            (:class:`~gnnst.reliability.OODReference`); ``None`` in models that predate it.
        reliability: the ``reliability`` config it was trained with (the default gene threshold, interval
            level, OOD settings).
        protocol: ``"honest"``, or the LEAKY note of ``eval.select_on_heldout`` runs.
        gnnst_version: version that trained it.
        feature_norm: the slide-shift corrections it was trained with (``features`` config): the stain reference
            a new slide's patches are mapped to (:meth:`FeatureState.stain_transform`, applied by
            :mod:`gnnst.inference`) and the per-slide standardisation of the embeddings (applied by
            :meth:`predict` through :meth:`features`). Training-only augmentation is not recorded.
    """

    model_name: str
    model_config: ModelConfig
    in_dim: int
    encoder: EncoderInfo
    patch_size_um: float
    panel: GenePanel
    expression: ExpressionConfig
    scaler: TargetScaler
    graph: GraphConfig
    batch_nodes: int
    num_hops: int
    states: list[dict] = field(repr=False)
    blend_alpha: float
    fold: dict
    cv: dict | None = None
    calibration: Calibration | None = None
    ood_reference: OODReference | None = None
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    protocol: str = "honest"
    gnnst_version: str = __version__
    feature_norm: FeatureState = field(default_factory=FeatureState)

    @classmethod
    def untrained(cls, encoder: EncoderInfo, genes: Sequence[str], *, model_config: ModelConfig | None = None,
                  patch_size_um: float = 150.0, graph: GraphConfig | None = None, batch_nodes: int = 512,
                  num_hops: int = 2, seed: int = 0) -> "TrainedModel":
        """One randomly initialised member for ``encoder``'s embeddings and the panel ``genes`` (identity
        scaling, head only): for speed and memory benchmarks and tests of the prediction path. Its
        predictions mean nothing."""
        import torch

        from gnnst.models import create_model

        mcfg = model_config or ModelConfig(predict_mode="head")
        torch.manual_seed(seed)
        model = create_model(mcfg.name, in_dim=encoder.dim, num_genes=len(genes), cfg=mcfg)
        genes = [str(g) for g in genes]
        return cls(model_name=mcfg.name, model_config=mcfg, in_dim=encoder.dim, encoder=encoder,
                   patch_size_um=patch_size_um, panel=GenePanel(genes=genes, heg=genes, hvg=genes, source_slides=[]),
                   expression=ExpressionConfig(), scaler=TargetScaler(np.zeros(len(genes), np.float32),
                                                                      np.ones(len(genes), np.float32)),
                   graph=graph or GraphConfig(), batch_nodes=batch_nodes, num_hops=num_hops,
                   states=[model.state_dict()], blend_alpha=1.0,
                   fold={"name": "untrained", "train_slides": [], "test_slides": [], "patient_disjoint": False})

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict:
        """The plain-data payload of :meth:`save`."""
        from gnnst.config import config_to_dict

        return {"format": FORMAT, "format_version": FORMAT_VERSION, "gnnst_version": self.gnnst_version,
                "model_name": self.model_name, "model_config": config_to_dict(self.model_config),
                "in_dim": int(self.in_dim), "encoder": dataclasses.asdict(self.encoder),
                "patch_size_um": float(self.patch_size_um), "panel": self.panel.to_dict(),
                "expression": config_to_dict(self.expression), "scaler": self.scaler.to_dict(),
                "graph": {"k": self.graph.k, "radius_um": self.graph.radius_um},
                "batch_nodes": int(self.batch_nodes), "num_hops": int(self.num_hops), "states": self.states,
                "blend_alpha": float(self.blend_alpha), "fold": self.fold, "cv": self.cv,
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "ood_reference": None if self.ood_reference is None else self.ood_reference.to_dict(),
                "reliability": config_to_dict(self.reliability), "protocol": self.protocol,
                "feature_norm": self.feature_norm.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically (see the module docstring); returns ``path``."""
        from gnnst.io import atomic_torch_save

        self.check(str(path))
        atomic_torch_save(self.to_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "TrainedModel":
        """Read a model file written by :meth:`save`. A missing, unreadable, foreign or old-format file is a
        one-line :class:`GnnstError` naming the file and what is wrong."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise GnnstError(f"model file not found: {path}")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GnnstError(f"{path}: not a gnnst model file (cannot read it as plain torch data: "
                             f"{type(e).__name__}: {first})") from None
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_dict(cls, d, *, where: str = "model") -> "TrainedModel":
        """Inverse of :meth:`to_dict`; ``where`` names the source in errors."""
        from gnnst.config import _from_dict

        if not isinstance(d, dict) or "format" not in d:
            if isinstance(d, dict) and "model_state" in d:
                raise GnnstError(f"{where}: a model.pt of an older gnnst (no 'format' field; TrainedModel format "
                                 f"{FORMAT_VERSION} is needed); retrain it with `gnnst train`")
            raise GnnstError(f"{where}: not a gnnst model file (no 'format' field; got {type(d).__name__})")
        if d["format"] != FORMAT:
            raise GnnstError(f"{where}: not a gnnst model file (format {d['format']!r}, expected {FORMAT!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise GnnstError(f"{where}: TrainedModel format version {version!r}, this gnnst reads version "
                             f"{FORMAT_VERSION}; {'upgrade gnnst' if isinstance(version, int) and version > FORMAT_VERSION else 'retrain it with `gnnst train`'}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d and n not in OPTIONAL_FIELDS]
        if missing:
            raise GnnstError(f"{where}: TrainedModel field '{missing[0]}' is missing")
        try:
            tm = cls(model_name=str(d["model_name"]), model_config=_from_dict(ModelConfig, d["model_config"], "model."),
                     in_dim=int(d["in_dim"]), encoder=EncoderInfo.from_dict(d["encoder"]),
                     patch_size_um=float(d["patch_size_um"]), panel=GenePanel.from_dict(d["panel"]),
                     expression=_from_dict(ExpressionConfig, d["expression"], "expression."),
                     scaler=TargetScaler.from_dict(d["scaler"]),
                     graph=GraphConfig(k=d["graph"]["k"], radius_um=d["graph"]["radius_um"]),
                     batch_nodes=int(d["batch_nodes"]), num_hops=int(d["num_hops"]), states=list(d["states"]),
                     blend_alpha=float(d["blend_alpha"]), fold=dict(d["fold"]), cv=d.get("cv"),
                     calibration=None if d.get("calibration") is None else Calibration.from_dict(d["calibration"]),
                     ood_reference=None if d.get("ood_reference") is None else
                     OODReference.from_dict(d["ood_reference"]),
                     reliability=_from_dict(ReliabilityConfig, d.get("reliability") or {}, "reliability."),
                     protocol=str(d.get("protocol", "honest")), gnnst_version=str(d["gnnst_version"]),
                     feature_norm=FeatureState.from_dict(d.get("feature_norm")))
        except GnnstError as e:
            raise GnnstError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise GnnstError(f"{where}: a TrainedModel field is malformed ({type(e).__name__}: {e})") from None
        tm.check(where)
        return tm

    def check(self, where: str = "model") -> None:
        """Raise when the parts disagree (gene panel, scaling, encoder width, sizes, members, blend)."""
        genes = list(self.panel.genes)
        if not genes or len(set(genes)) != len(genes):
            raise GnnstError(f"{where}: the gene panel ('panel.genes') is empty or lists a gene twice")
        for part in ("mean", "std"):
            n = len(getattr(self.scaler, part))
            if n != len(genes):
                raise GnnstError(f"{where}: 'scaler.{part}' has {n} values for a panel of {len(genes)} genes")
        for kind in ("heg", "hvg"):
            extra = [g for g in getattr(self.panel, kind) if g not in set(genes)]
            if extra:
                raise GnnstError(f"{where}: 'panel.{kind}' gene '{extra[0]}' is not in the panel")
        if self.encoder.dim != self.in_dim:
            raise GnnstError(f"{where}: encoder width {self.encoder.dim} != model input width {self.in_dim}")
        if not self.patch_size_um > 0:
            raise GnnstError(f"{where}: 'patch_size_um' must be > 0, got {self.patch_size_um}")
        if self.batch_nodes < 1 or self.num_hops < 0:
            raise GnnstError(f"{where}: 'batch_nodes' must be >= 1 and 'num_hops' >= 0, got {self.batch_nodes}, "
                             f"{self.num_hops}")
        if not self.states:
            raise GnnstError(f"{where}: no ensemble member ('states' is empty)")
        if not 0.0 <= self.blend_alpha <= 1.0:
            raise GnnstError(f"{where}: 'blend_alpha' must be in [0, 1], got {self.blend_alpha}")
        sn = self.feature_norm.slide_norm
        if sn is not None and (len(sn.mean) != self.in_dim or len(sn.std) != self.in_dim):
            raise GnnstError(f"{where}: 'feature_norm.slide_norm' has statistics of width {len(sn.mean)} for input "
                             f"width {self.in_dim}")
        if self.ood_reference is not None and self.ood_reference.features.shape[1] != self.in_dim:
            raise GnnstError(f"{where}: 'ood_reference' has features of width {self.ood_reference.features.shape[1]}, "
                             f"the model reads width {self.in_dim}")

    # ------------------------------------------------------------------ prediction
    def models(self, device="cpu") -> list["ExpressionModel"]:
        """The ensemble members on ``device``, in eval mode."""
        from gnnst.models import create_model

        out = []
        for state in self.states:
            model = create_model(self.model_name, in_dim=self.in_dim, num_genes=len(self.panel.genes),
                                 cfg=self.model_config)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:  # shapes disagree: another panel size or embedding width
                raise GnnstError(f"model '{self.model_name}': the weights do not fit a panel of "
                                 f"{len(self.panel.genes)} genes and input width {self.in_dim} "
                                 f"({str(e).strip().splitlines()[-1].strip()})") from None
            out.append(model.to(device).eval())
        return out

    def modes(self) -> tuple[str, ...]:
        """The primitive prediction modes :meth:`predict` combines: head, retrieval or both (blend)."""
        return ("head",) if self.blend_alpha == 1.0 else ("retrieval",) if self.blend_alpha == 0.0 else \
            ("head", "retrieval")

    def features(self, graph: "Data", *, warn: bool = True) -> np.ndarray:
        """``[N, D]`` float32: the features of a slide graph the model reads, the ones out-of-distribution
        scores compare (:attr:`ood_reference` is built from the training slides' through here): its ``x``
        (the embeddings, of stain-normalised patches when :attr:`feature_norm` says so) after the per-slide
        standardisation it was trained with. The one function from a graph to the members' input."""
        from gnnst import keys

        return self.feature_norm.inputs(graph.x, slide=f"slide '{getattr(graph, keys.DATA_SLIDE, None) or 'slide'}'",
                                        warn=warn)

    def gene_reliability(self, threshold: float | None = None) -> GeneReliability:
        """Per-gene reliability of the panel (:class:`~gnnst.reliability.GeneReliability`) at ``threshold``
        (default: ``reliability.reliable_pcc`` of the training run)."""
        t = self.reliability.reliable_pcc if threshold is None else float(threshold)
        fold = str(self.fold.get("name", "")) if self.fold.get("test_slides") else None
        return GeneReliability.from_cv(self.cv, self.panel.genes, t, fold=fold)

    def predict(self, graphs: "Data | Sequence[Data]", *, device="cpu", members: bool = True, ood: bool = True
                ) -> "Prediction | list[Prediction]":
        """Predicted expression of each slide graph (``x``, ``pos``, ``edge_index``, ``edge_attr``; ``y`` is
        not read), in the panel's units (:attr:`expression`). ``x`` holds the slide's embeddings as
        :mod:`gnnst.inference` makes them (stain-normalised patches when :attr:`feature_norm` says so); the
        per-slide standardisation is applied here (:meth:`features`); ``x_views`` is never read.

        Each member predicts by halo mini-batches (:attr:`batch_nodes`, :attr:`num_hops`), the head and
        retrieval outputs blended with :attr:`blend_alpha` (:func:`gnnst.models.base.blend`); members are
        averaged, then the target scaling is undone. With ``members`` the per-member predictions come
        too (their sd: :attr:`Prediction.sd`); with ``ood`` (and an :attr:`ood_reference`) each spot's
        out-of-distribution score and flag. Returns one :class:`Prediction` per graph (a single one for a
        single graph).
        """
        import torch
        from torch_geometric.data import Data

        from gnnst.models.base import blend

        single = isinstance(graphs, Data)
        graphs = [graphs] if single else list(graphs)
        for g in graphs:
            if g.x is None or g.x.dim() != 2 or g.x.shape[1] != self.in_dim:
                raise GnnstError(f"embedding width mismatch: the graph has x of shape "
                                 f"{None if g.x is None else list(g.x.shape)}, the model reads width {self.in_dim}")
        device = torch.device(device) if isinstance(device, str) else device
        originals, graphs = graphs, [self._as_input(g) for g in graphs]
        modes = self.modes()
        per_member = []  # [M][graph] -> [N, G] standardised
        for model in self.models(device):
            out = predict_graphs(model, graphs, batch_nodes=self.batch_nodes, num_hops=self.num_hops, device=device,
                                 modes=modes)
            if len(modes) == 1:
                per_member.append(out[modes[0]])
            else:
                per_member.append([blend(h, r, self.blend_alpha) for h, r in zip(out["head"], out["retrieval"])])
        result = []
        for i in range(len(graphs)):
            stack = np.stack([m[i] for m in per_member])  # [M, N, G]
            expr = self.scaler.inverse(stack.mean(0)).astype(np.float32)
            score = self.ood_reference.score(self.features(originals[i], warn=False)) \
                if ood and self.ood_reference is not None else None
            result.append(Prediction(expression=expr,
                                     members=self.scaler.inverse(stack).astype(np.float32) if members else None,
                                     ood_score=score, ood=None if score is None else self.ood_reference.flag(score)))
        return result[0] if single else result

    def _as_input(self, g: "Data") -> "Data":
        """A shallow copy of ``g`` with ``x`` = :meth:`features` (in ``g.x``'s dtype) and no ``x_views``."""
        from gnnst import keys

        d = copy.copy(g)
        if getattr(d, keys.DATA_X_VIEWS, None) is not None:
            del d[keys.DATA_X_VIEWS]
        return self.feature_norm.graph_inputs(d)

    def slide_graph(self, pixel: np.ndarray, mpp: float) -> "SlideGraph":
        """A slide's graph with this model's graph parameters (:func:`gnnst.graph.edges.slide_graph`)."""
        from gnnst.graph.edges import slide_graph

        return slide_graph(pixel, mpp, k=self.graph.k, radius_um=self.graph.radius_um)

    def create_encoder(self, device) -> "PatchEncoder":
        """This model's patch encoder on ``device``; an encoder that differs from the training one raises."""
        from gnnst.data.encoders import create_encoder

        e = self.encoder
        enc = create_encoder(e.name, checkpoint=e.checkpoint, timm_kwargs=e.timm_kwargs).to(device, e.precision)
        if enc.identity != self.encoder.identity or enc.dim != self.in_dim:
            raise GnnstError(f"encoder mismatch: the model was trained on '{self.encoder.identity}' embeddings "
                             f"(width {self.in_dim}), this machine's encoder is '{enc.identity}' (width {enc.dim})")
        return enc
