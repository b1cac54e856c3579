"""Configuration: nested dataclasses with a comment on every field.

Precedence: dataclass defaults < YAML file (only what differs) < dotted command-line overrides
(``train.lr=1e-3``). An unknown key anywhere is a :class:`~gnnst.errors.GnnstError` naming it.
Sizes that come from the data (number of genes, embedding width) are never set here.

A run folder holds one run made with one config (:mod:`gnnst.outputs`): ``--resume`` refuses a config
that differs from the folder's ``config.yaml`` in any key but those of :data:`RESULT_NEUTRAL`, the keys
that change where files are found, how fast the work runs or what is drawn, never a number of a fold.
The device (``train.device``, ``encoder.device``) and ``train.amp`` are NOT among them: GPU kernels and
mixed precision change results beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from gnnst.errors import GnnstError


# --- value ranges, checked when a section is built (so before any file is read) ----------------
@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric config key: ``lo <= v`` (``lo < v`` when ``lo_open``), likewise ``hi``;
    ``None`` also allowed when the key's type admits it. Values must be finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "finite"


def num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None) -> Any:
    """A numeric dataclass field with its allowed range (``ge``/``gt``: lower bound, ``le``/``lt``: upper)."""
    rng = Range(lo=gt if gt is not None else ge, hi=lt if lt is not None else le, lo_open=gt is not None,
                hi_open=lt is not None)
    return field(default=default, metadata={"range": rng})


class _Section:
    """Base of every config section: ``__post_init__`` checks each numeric field against its :func:`num`
    range and names the offending key (``config key 'train.batch_nodes': expected an integer >= 1, got 0``).
    ``key`` is the section's name in the config (``train``)."""

    key: ClassVar[str] = ""

    def bad(self, name: str, want: str) -> GnnstError:
        where = f"{self.key}.{name}" if self.key else name
        return GnnstError(f"config key '{where}': expected {want}, got {getattr(self, name)!r}")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            rng = f.metadata.get("range")
            if rng is None:
                continue
            v = getattr(self, f.name)
            nullable = type(None) in typing.get_args(hints[f.name])
            if v is None and nullable:
                continue
            integer = int in (hints[f.name], *typing.get_args(hints[f.name]))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not rng.contains(float(v)):
                raise self.bad(f.name, f"{'an integer' if integer else 'a number'} {rng.describe()}"
                                       f"{' or null' if nullable else ''}")
        self.check()

    def check(self) -> None:
        """Checks across fields of the section (none by default)."""


@dataclass
class DataConfig(_Section):
    key: ClassVar[str] = "data"
    manifest: str = "data_manifests/her2st.yaml"  # dataset manifest (YAML), relative to the cwd
    data_root: str | None = None  # where the manifest's files live; else $GNNST_DATA_ROOT, then defaults
    cache_dir: str | None = None  # downloads + embedding cache; else $GNNST_CACHE, else ~/.cache/gnnst
    slides: list[str] | None = None  # subset of manifest slide ids to use; None = all
    download: bool = True  # fetch missing files from the manifest's public source
    # a `gnnst build-graphs` output folder to train from (`gnnst train --graphs DIR`): the raw slides are not
    # read; null = build the graphs of `manifest` into <cache>/graphs/ first, or reuse a matching build there
    graphs: str | None = None


@dataclass
class PatchConfig(_Section):
    key: ClassVar[str] = "patch"
    # physical side of the square patch cut around each spot centre; null = the encoder's own (its input
    # size at the µm per pixel it was trained at: 112 for UNI, H-optimus, Virchow2...; 150 for the default)
    size_um: float | None = num(None, gt=0)
    pad_value: int = num(255, ge=0, le=255)  # fill for the part of a border patch outside the image (white)


@dataclass
class EncoderConfig(_Section):
    key: ClassVar[str] = "encoder"
    name: str = "efficientnet_lite0"  # registry name, recipe (uni, uni2-h, h-optimus-0, ...), "timm:<model>" or "torchscript:<path>"
    checkpoint: str | None = None  # local weights file (a recipe's file as its authors distribute it, or timm:<model>'s)
    # architecture arguments of a timm:<model> (e.g. {init_values: 1.0e-5, reg_tokens: 4}; classes as dotted
    # names: mlp_layer: timm.layers.SwiGLUPacked); recipes fix their own
    timm_kwargs: dict[str, Any] | None = None
    batch_size: int | None = num(None, ge=1)  # patches per forward pass; null = 6 on CPU, 256 on CUDA (gnnst.data.encoders)
    num_threads: int | None = num(None, ge=1)  # torch CPU threads; None = all cores
    device: str = "auto"  # "auto" (cuda when present; LOCAL_RANK's GPU under torchrun), "cpu" or "cuda[:i]"
    # arithmetic of the forward pass: auto = bfloat16 on CUDA where supported (float16 on older GPUs),
    # float32 on CPU; lower precisions are cached apart from float32 embeddings
    precision: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # processes that decode images and cut patches while the encoder runs (each opens its own image
    # handle); null = 0 on CPU (this process, next image decoded in a thread), one per core less one
    # (at most 8) on CUDA
    num_workers: int | None = num(None, ge=0)

    def check(self) -> None:
        if self.timm_kwargs is not None and not (isinstance(self.timm_kwargs, dict)
                                                 and all(isinstance(k, str) for k in self.timm_kwargs)):
            raise self.bad("timm_kwargs", "a mapping of argument names to values")


@dataclass
class ExpressionConfig(_Section):
    key: ClassVar[str] = "expression"
    target_sum: float | None = num(1e4, gt=0)  # scanpy normalize_total target; None = median of totals
    log1p: bool = True  # apply sc.pp.log1p after normalising
    n_top_expressed: int = num(250, ge=1)  # highly expressed genes in the panel (by mean normalised expression)
    n_top_variable: int = num(250, ge=1)  # highly variable genes in the panel (scanpy seurat flavour)
    min_spot_fraction: float = num(0.1, ge=0, le=1)  # a panel gene must be detected in at least this fraction of spots
    # build-graphs stores the raw counts of every gene detected in at least this fraction of the spots of
    # some slide: the candidates among which each fold chooses its panel (needs min_spot_fraction >= it)
    candidate_fraction: float = num(0.01, ge=0, le=1)
    # a panel chosen on more training spots than this reads the slides one at a time: detection and mean
    # expression over every spot, the highly-variable ranking on a seeded sample of about this many spots
    # (each slide in proportion, at least 10 of each); at most this many, every spot at once, as a dense
    # spots x candidate genes float32 matrix (gnnst.data.expression.select_panel); null = always every spot
    panel_spots: int | None = num(50000, ge=2)

    def check(self) -> None:
        if self.min_spot_fraction < self.candidate_fraction:
            raise GnnstError(f"config key 'expression.min_spot_fraction': {self.min_spot_fraction} is below "
                             f"expression.candidate_fraction={self.candidate_fraction} (panels are chosen among the "
                             "genes the graphs store)")


@dataclass
class GraphConfig(_Section):
    key: ClassVar[str] = "graph"
    k: int | None = num(6, ge=1)  # k nearest neighbours per spot (same slide); None = off
    radius_um: float | None = num(None, gt=0)  # also join all spots within this distance (µm); None = off
    # dtype of the node arrays x [N, D] and y [N, G] as stored and held in memory: float32, float16
    # (half the memory; batches are widened to float32 for the model), or auto = float16 for slides of
    # more than 200,000 spots (Visium HD bins), float32 otherwise
    storage: typing.Literal["auto", "float32", "float16"] = "auto"

    def check(self) -> None:
        if self.k is None and self.radius_um is None:
            raise GnnstError("config key 'graph.k': set at least one of graph.k and graph.radius_um (both are null)")




@dataclass
class FeaturesConfig(_Section):
    """What is done to a slide's patches and embeddings before the model sees them, to reduce the shift
    between slides (staining, scanner, thickness). Each uses the slide's own images only, never its
    expression, so it applies alike to training, held-out and new slides (:mod:`gnnst.graph.features`)."""

    key: ClassVar[str] = "features"
    # per-slide standardisation of the patch embeddings: "standardize" = each embedding dimension minus the
    # slide's own mean, over the slide's own sd (a slide of fewer than min_spots spots: the training slides'
    # statistics, with a warning); "none" = embeddings as the encoder gives them
    slide_norm: typing.Literal["none", "standardize"] = "none"
    min_spots: int = num(50, ge=2)  # fewest spots whose own statistics standardise a slide (slide_norm)
    # stain normalisation of every patch before the encoder (gnnst.data.stain), the slide's stain estimated on
    # its own pixels and mapped to a reference estimated on the training slides' pixels (per fold; all slides
    # for the final model; recorded in the TrainedModel): "macenko" (stain vectors + concentrations),
    # "reinhard" (LAB mean and sd), "none". Default macenko: chosen on the inner validation by
    # `benchmarks/accuracy.py --suite shift` (README, "Slide-to-slide shift")
    stain_norm: typing.Literal["none", "macenko", "reinhard"] = "macenko"
    stain_sample_spots: int = num(256, ge=1)  # spots per slide whose patches estimate its stain (evenly spaced)
    # training only: augmented embeddings per spot (HED jitter of the patches, Tellez et al. 2018), computed
    # once and cached; each epoch a spot's input is one of its 1 + stain_augment views (view 0 unaugmented);
    # validation, baselines' scoring and prediction see view 0 only. 0 = off
    stain_augment: int = num(0, ge=0, le=32)
    stain_augment_sigma: float = num(0.05, ge=0, lt=1)  # HED jitter: each stain's concentration x U(1-s, 1+s) ...
    stain_augment_bias: float = num(0.05, ge=0, lt=1)  # ... + U(-b, b), one draw per slide and view


PREDICT_MODES = ("head", "retrieval", "blend")  # allowed values of ModelConfig.predict_mode


@dataclass
class ModelConfig(_Section):
    """Model hyper-parameters (sizes that come from the data are not here).

    Every component of :class:`~gnnst.models.gnnst.GNNST` has a switch, so each ablation is one
    override (``model.use_graph=false``); the comparison models read the fields they name.
    """

    key: ClassVar[str] = "model"
    name: str = "gnnst"  # registered model name (gnnst.models.registry: gnnst, bleep, mclstexp, ...)
    hidden: int = num(256, ge=1)  # width of every embedding inside the model
    proj_dim: int = num(256, ge=1)  # width of the shared image/expression contrastive space (and retrieval bank)
    heads: int = num(4, ge=1)  # attention heads per message-passing layer; must divide `hidden`
    num_layers: int = num(2, ge=1)  # message-passing rounds = receptive field in hops (the last is the centre's
    #                                 cross-attention read-out); keep train.num_hops >= num_layers
    dropout: float = num(0.1, ge=0, lt=1)  # dropout inside MLPs and on attention weights
    input_dropout: float = num(0.1, ge=0, lt=1)  # dropout on the patch embedding x before the query branch
    edge_scale_um: float = num(200.0, gt=0)  # edge_attr (µm) is divided by this before the edge encoder (~ one ST spot pitch)
    edge_augment: bool = True  # training only: random rotation/reflection of (dx, dy); tissue has no fixed orientation
    # --- components (ablations) -----------------------------------------------------------
    use_graph: bool = True  # neighbour branch on/off; off = spot-only model and no neighbourhood-scale loss
    use_contrastive: bool = True  # gene branch + both InfoNCE losses; off = no shared space, predict uses the head
    use_neighbourhood_scale: bool = True  # neighbourhood-scale InfoNCE (acts only with use_graph and use_contrastive)
    use_masked_recon: bool = False  # cross-modal masked expression reconstruction (CMRCNet-style)
    mask_ratio: float = num(0.5, gt=0, lt=1)  # fraction of genes hidden per spot for the masked reconstruction
    # --- loss weights (GNNST.loss); a weight of 0 drops that term ---------------------------
    w_mse: float = num(1.0, ge=0)  # regression head vs y
    w_clip_spot: float = num(1.0, ge=0)  # spot-scale InfoNCE, z_img vs z_gene
    w_clip_nbhd: float = num(0.5, ge=0)  # neighbourhood-scale InfoNCE, z_img_nb vs z_gene_nb
    w_recon: float = num(0.5, ge=0)  # masked reconstruction MSE on the hidden genes
    # --- prediction (GNNST.predict) --------------------------------------------------------
    predict_mode: str = "blend"  # "head", "retrieval" (bank of training spots) or "blend" of both
    retrieval_k: int = num(50, ge=1)  # training spots averaged per query (softmax of similarity x logit scale)
    blend_alpha: float = num(0.5, ge=0, le=1)  # weight of the regression head in "blend"; 1 - alpha goes to retrieval
    # most training spots in a retrieval bank (gnnst, bleep, mclstexp): every training spot while they are at
    # most this many, else a seeded uniform sample of this many, the same spots at every epoch
    # (gnnst.models.retrieval.bank_nodes); the bank is held in the model and saved with it: this many x
    # (genes + proj_dim) x 4 bytes (50,000 x (492 + 256) x 4 = 150 MB); null = every training spot
    retrieval_bank_spots: int | None = num(50000, ge=1)

    def check(self) -> None:
        if self.hidden % self.heads:
            raise GnnstError(f"config key 'model.heads': {self.heads} does not divide model.hidden={self.hidden}")
        if self.predict_mode not in PREDICT_MODES:
            raise self.bad("predict_mode", f"one of {', '.join(PREDICT_MODES)}")


@dataclass
class TrainConfig(_Section):
    key: ClassVar[str] = "train"
    epochs: int = num(60, ge=1)  # maximum epochs per fold
    lr: float = num(1e-3, gt=0)  # AdamW learning rate
    weight_decay: float = num(1e-4, ge=0)  # AdamW weight decay
    warmup_epochs: int = num(3, ge=0)  # linear warm-up, then cosine decay
    # centre spots per subgraph mini-batch (halo spots come on top); null = by device: 512 on CPU,
    # 2048 on CUDA (gnnst.train.trainer.default_batch_nodes), resolved before the run starts
    batch_nodes: int | None = num(None, ge=1)
    num_hops: int = num(2, ge=0)  # halo depth of each mini-batch subgraph (>= model message-passing depth)
    patience: int = num(15, ge=1)  # early stopping on the validation score (epochs without improvement)
    val_fraction: float = num(0.15, ge=0, lt=1)  # fraction of training spots held out (as spatial blocks) for validation
    # most validation spots scored (each epoch's score, hence early stopping and the checkpoint; the blend
    # weight; the spread's scale): every spot of the validation blocks while they are at most this many,
    # else a seeded uniform sample of this many (the rest stay out of training all the same). Bounds the
    # per-epoch validation pass and the [spots, genes] arrays it holds at cohort scale; null = all
    val_spots: int | None = num(10000, ge=1)
    amp: bool = True  # mixed precision on CUDA: bfloat16 where the GPU supports it, else float16 (ignored on CPU)
    device: str = "auto"  # "auto", "cpu" or "cuda[:i]"
    num_threads: int | None = num(None, ge=1)  # torch CPU threads; None = all cores
    ensemble: int = num(3, ge=1)  # models trained per fold with seeds seed..seed+ensemble-1; predictions averaged
    # on a CPU outside torchrun, on Linux: ensemble members trained side by side in forked processes that
    # share the training threads (at least one each; gnnst.train.ensemble.member_processes); null = every
    # member at once when training has 2 threads or more, else one at a time; 1 = one at a time with every
    # thread
    member_procs: int | None = num(None, ge=1)
    select_blend: bool = True  # choose the head/retrieval blend weight on the validation spots (per fold)
    # mini-batch sampling: "host" (numpy on the CPU, each batch copied to the device), "device" (the
    # slides resident on the training device, halo subgraphs cut there for a whole epoch at once, no host
    # synchronisation per step), "auto" = device on CUDA when the slides fit in its memory, else host
    sampler: typing.Literal["auto", "host", "device"] = "auto"
    # under torchrun: "folds" spreads the folds and their ensemble members (and the final model's members)
    # over the ranks, one model per rank at a time, each fold prepared only by the ranks that train it and
    # scored by one (the output folder must be on a filesystem every rank sees); "ddp" trains each model
    # on every rank with its gradients all-reduced (for one model too large for one device)
    distributed: typing.Literal["folds", "ddp"] = "folds"
    # seconds between two writes of a member's resume checkpoint (last.pt: weights and optimiser, ~3x the
    # model's size) and of best.pt; the last epoch is always written; 0 = every epoch. A resumed run
    # replays the epochs after the checkpoint and ends equal to an uninterrupted one
    checkpoint_every_s: float = num(60.0, ge=0)


BASELINES = ("mean", "ridge", "ridge_neighbours")  # allowed values of EvalConfig.baselines (gnnst.eval.baselines)


@dataclass
class EvalConfig(_Section):
    key: ClassVar[str] = "eval"
    n_heg: int = num(50, ge=1)  # top highly expressed genes reported (chosen on training slides)
    n_hvg: int = num(50, ge=1)  # top highly variable genes reported (chosen on training slides)
    # how the reported HVG-n are chosen (gnnst.metrics): "seurat" = scanpy's seurat dispersion ranking of the
    # panel (genes detected in >= expression.min_spot_fraction of training spots); "variance" = highest
    # variance of the normalised expression among the panel genes on the training spots (HEST-Benchmark)
    hvg: typing.Literal["seurat", "variance"] = "seurat"
    folds: typing.Literal["auto", "patient", "slide"] = "auto"  # "auto": patients if >= 3, else slides
    only_folds: list[str] | None = None  # run only these folds (by name or test slide id); None = all
    # baselines fitted on the same folds, panels and embeddings (gnnst.eval.baselines): "mean" (mean of the
    # training spots), "ridge" (PCA 256 + ridge on the spot's embedding, HEST-Benchmark), "ridge_neighbours"
    # (the same on [spot embedding, mean embedding of its graph neighbours]: the bar a graph model must clear)
    baselines: list[typing.Literal["mean", "ridge", "ridge_neighbours"]] = field(
        default_factory=lambda: ["ridge", "ridge_neighbours"])
    # most training rows a baseline is fitted on (spots, x views with features.stain_augment): all of them
    # while they are at most this many, else a seeded uniform sample of this many (gnnst.sampling); bounds
    # the baselines' memory at cohort scale (ridge_neighbours: this many x 2 x the embedding width x 4
    # bytes, 512 MB at 50,000 x 1280); null = every row
    baseline_spots: int | None = num(50000, ge=2)
    figures: bool = True  # write PNG figures (maps, per-gene PCC, Moran's I) into OUT/figures after training
    # after the folds, train the same way on every slide (panel, normalisation and validation blocks from
    # all of them) and write OUT/final/model.pt: the model for `gnnst predict` on new slides (no metrics:
    # nothing is held out, the folds' figures are its estimate)
    final_model: bool = True
    # LEAKY, for comparison with published numbers only: true chooses the gene panel and the reported
    # subsets on all slides including the held-out one, and early stopping, checkpoint and blend on the
    # held-out slide (its spots are the validation set). Outputs of such a run say LEAKY.
    select_on_heldout: bool = False


@dataclass
class ReliabilityConfig(_Section):
    """How far to trust a prediction (gnnst.reliability): per gene, per spot, per region."""

    key: ClassVar[str] = "reliability"
    # var['gnnst_reliable'] of every prediction: the gene's cross-validated PCC (mean over held-out slides,
    # var['gnnst_cv_pcc']) is at least this; `gnnst predict --reliable-pcc` overrides it for one prediction
    reliable_pcc: float = num(0.3, ge=-1, le=1)
    # nominal coverage of the interval pred +- z * scale * layers['gnnst_sd'] (z of a normal at this level);
    # the one scale factor is fitted on the validation spots of the training slides to reach it there
    interval_level: float = num(0.9, gt=0, lt=1)
    ood_k: int = num(10, ge=1)  # nearest training embeddings averaged in obs['gnnst_ood_score']
    # obs['gnnst_ood'] flags a spot whose score exceeds this quantile of the training spots' own
    # (leave-one-slide-out) scores
    ood_quantile: float = num(0.99, gt=0, lt=1)
    # training spots kept in the model as the OOD reference (seeded subsample, float16: 2 bytes x width
    # each, 25.6 MB for 10,000 spots of 1280-wide embeddings)
    ood_reference: int = num(10000, ge=2)


ABLATION_SETTINGS = ["none", "k=4", "k=6", "k=8", "r=300", "r=450", "r=600"]  # default of AblationConfig.settings


@dataclass
class AblationConfig(_Section):
    key: ClassVar[str] = "ablation"
    settings: list[str] = field(default_factory=lambda: list(ABLATION_SETTINGS))  # neighbourhoods compared:
    #   "none" (model.use_graph=false), "k=<int>" (k nearest), "r=<µm>" (radius), "k=<int>,r=<µm>" (both)
    ensemble: int = num(1, ge=1)  # models per fold in every setting (replaces train.ensemble; 1 keeps the run short)
    baselines: bool = True  # also report eval.baselines (fitted once, in the first setting)
    keep_checkpoints: bool = False  # keep each setting's per-member last/best.pt (model.pt is always kept)


@dataclass
class Config(_Section):
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    seed: int = num(0, ge=0)  # seed for every random choice
    num_workers: int = num(0, ge=0)  # reserved for data loading processes


# --- keys that do not change results (a resumed run may differ in these only) -------------------
RESULT_NEUTRAL: dict[str, str] = {
    "data.data_root": "where the manifest's files are found (the same files: their sha256 in the manifest, "
                      "where given, is checked on every read)",
    "data.cache_dir": "where downloads and embeddings are cached (embeddings are keyed by encoder, patch size "
                      "and image, not by the cache's place)",
    "data.download": "whether missing files may be fetched",
    "data.graphs": "where the graphs are read from: a graph folder gives every fold the same panel, targets "
                   "and graphs as the raw slides it was built from (its config is checked against the run's)",
    "encoder.batch_size": "patches per encoder pass (the encoder runs in eval mode: a patch's embedding does not "
                          "depend on its batch, up to float rounding)",
    "encoder.num_threads": "CPU threads of the encoder (equal up to float rounding)",
    "train.num_threads": "CPU threads of training (equal up to float rounding)",
    "train.member_procs": "how many ensemble members train side by side, sharing the CPU threads (equal up to "
                          "float rounding: each member's threads)",
    "train.checkpoint_every_s": "how often resume checkpoints are written (a resumed run replays the epochs "
                                "after its checkpoint with the same per-epoch seeds)",
    "num_workers": "reserved for data-loading processes (nothing reads it yet)",
    "eval.figures": "whether figures are drawn after training",
    "eval.only_folds": "which folds run now: each fold is trained and scored the same way whatever the others "
                       "(metrics.json summarises the folds of the latest call)",
    "eval.final_model": "whether the final model is trained after the folds; no fold depends on it",
    "ablation.keep_checkpoints": "whether each setting's per-member checkpoints are kept",
}


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{'train.lr': 0.001, ...}`` (lists are values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (as dicts), a key present in one
    only included; sorted."""
    a, b = flat_config(old), flat_config(new)
    missing = object()
    return sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing))


# ------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ``where`` names the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except GnnstError as e:
                errors.append(str(e))
        raise GnnstError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise GnnstError(f"config key '{where}': expected one of {', '.join(map(repr, allowed))}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise GnnstError(f"config key '{where}': expected a list, got {value!r}")
        (a,) = typing.get_args(tp)
        return [_coerce(v, a, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise GnnstError(f"config key '{where}': expected a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=f"{where}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise GnnstError(f"config key '{where}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise GnnstError(f"config key '{where}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise GnnstError(f"config key '{where}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise GnnstError(f"config key '{where}': expected a string, got {value!r}")
    return value


def _from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise GnnstError(
            f"unknown config key '{prefix}{unknown[0]}' (known under '{prefix or '<top>'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in d.items()}
    return cls(**kwargs)


def _merge(base: dict, diff: dict) -> dict:
    out = dict(base)
    for k, v in diff.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["train.lr=1e-3", "graph.k=8"]`` -> nested dict; values parsed as YAML scalars."""
    import yaml

    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise GnnstError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise GnnstError(f"override '{item}': empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise GnnstError(f"override '{item}': value is not valid YAML ({e})") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise GnnstError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict | None = None) -> Config:
    """Defaults < ``base`` < YAML at ``path`` < dotted ``overrides``. Unknown keys raise, naming the key
    and file. ``base``: a nested dict of values between the defaults and the file (a graph folder's
    :data:`gnnst.graph.store.DATASET_KEYS` for a ``--graphs`` run)."""
    import yaml

    merged: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GnnstError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise GnnstError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise GnnstError(f"config file {p}: top level must be a mapping, got {type(loaded).__name__}")
        merged = loaded
    merged = _merge(_merge(base or {}, merged), parse_overrides(overrides))
    try:
        return _from_dict(Config, merged)
    except GnnstError as e:
        src = f" (in {path} or the command line)" if path else ""
        raise GnnstError(f"{e}{src}") from None


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain Python (for YAML/JSON dumps)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    from gnnst.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
