"""Configuration: nested dataclasses with a comment on every field.

Precedence: dataclass defaults < YAML file (only what differs) < dotted command-line overrides
(``train.lr=1e-3``). An unknown key anywhere is a :class:`~gnnst.errors.GnnstError` naming it.
Sizes that come from the data (number of genes, embedding width) are never set here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnnst.errors import GnnstError
from gnnst.models.config import ModelConfig


@dataclass
class DataConfig:
    manifest: str = "data_manifests/her2st.yaml"  # dataset manifest (YAML), relative to the cwd
    data_root: str | None = None  # where the manifest's files live; else $GNNST_DATA_ROOT, then defaults
    cache_dir: str | None = None  # downloads + embedding cache; else $GNNST_CACHE, else ~/.cache/gnnst
    slides: list[str] | None = None  # subset of manifest slide ids to use; None = all
    download: bool = True  # fetch missing files from the manifest's public source


@dataclass
class PatchConfig:
    # physical side of the square patch cut around each spot centre; null = the encoder's own (its input
    # size at the µm per pixel it was trained at: 112 for UNI, H-optimus, Virchow2...; 150 for the default)
    size_um: float | None = None
    pad_value: int = 255  # fill for the part of a border patch that lies outside the image (white)


@dataclass
class EncoderConfig:
    name: str = "efficientnet_lite0"  # registry name, recipe (uni, uni2-h, h-optimus-0, ...), "timm:<model>" or "torchscript:<path>"
    checkpoint: str | None = None  # local weights file (a recipe's file as its authors distribute it, or timm:<model>'s)
    # architecture arguments of a timm:<model> (e.g. {init_values: 1.0e-5, reg_tokens: 4}; classes as dotted
    # names: mlp_layer: timm.layers.SwiGLUPacked); recipes fix their own
    timm_kwargs: dict[str, Any] | None = None
    batch_size: int | None = None  # patches per forward pass; null = 6 on CPU, 256 on CUDA (gnnst.data.encoders)
    num_threads: int | None = None  # torch CPU threads; None = all cores
    device: str = "auto"  # "auto" (cuda when present; LOCAL_RANK's GPU under torchrun), "cpu" or "cuda[:i]"
    # arithmetic of the forward pass: auto = bfloat16 on CUDA where supported (float16 on older GPUs),
    # float32 on CPU; lower precisions are cached apart from float32 embeddings
    precision: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # processes that decode images and cut patches while the encoder runs (each opens its own image
    # handle); null = 0 on CPU (this process, next image decoded in a thread), one per core less one
    # (at most 8) on CUDA
    num_workers: int | None = None

    def __post_init__(self):
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise GnnstError(f"config key 'encoder.batch_size': expected an integer >= 1 or null, got {self.batch_size!r}")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or self.num_workers < 0):
            raise GnnstError(f"config key 'encoder.num_workers': expected an integer >= 0 or null, got {self.num_workers!r}")
        if self.timm_kwargs is not None and not (isinstance(self.timm_kwargs, dict)
                                                 and all(isinstance(k, str) for k in self.timm_kwargs)):
            raise GnnstError(f"config key 'encoder.timm_kwargs': expected a mapping of argument names to values, "
                             f"got {self.timm_kwargs!r}")


@dataclass
class ExpressionConfig:
    target_sum: float | None = 1e4  # scanpy normalize_total target; None = median of totals
    log1p: bool = True  # apply sc.pp.log1p after normalising
    n_top_expressed: int = 250  # highly expressed genes in the panel (by mean normalised expression)
    n_top_variable: int = 250  # highly variable genes in the panel (scanpy seurat flavour)
    min_spot_fraction: float = 0.1  # a panel gene must be detected in at least this fraction of spots


@dataclass
class GraphConfig:
    k: int | None = 6  # k nearest neighbours per spot (same slide); None = off
    radius_um: float | None = None  # also join all spots within this distance (µm); None = off
    # dtype of the node arrays x [N, D] and y [N, G] as stored and held in memory: float32, float16
    # (half the memory; batches are widened to float32 for the model), or auto = float16 for slides of
    # more than 200,000 spots (Visium HD bins), float32 otherwise
    storage: typing.Literal["auto", "float32", "float16"] = "auto"


@dataclass
class TrainConfig:
    epochs: int = 60  # maximum epochs per fold
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_epochs: int = 3  # linear warm-up, then cosine decay
    batch_nodes: int = 512  # centre spots per subgraph mini-batch (halo spots come on top)
    num_hops: int = 2  # halo depth of each mini-batch subgraph (>= model message-passing depth)
    patience: int = 15  # early stopping on the validation loss (epochs without improvement)
    val_fraction: float = 0.15  # fraction of training spots held out (as spatial blocks) for validation
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    device: str = "auto"  # "auto", "cpu" or "cuda[:i]"
    num_threads: int | None = None  # torch CPU threads; None = all cores
    ensemble: int = 3  # models trained per fold with seeds seed..seed+ensemble-1; predictions averaged
    select_blend: bool = True  # choose the head/retrieval blend weight on the validation spots (per fold)


@dataclass
class EvalConfig:
    n_heg: int = 50  # top highly expressed genes reported (chosen on training slides)
    n_hvg: int = 50  # top highly variable genes reported (chosen on training slides)
    folds: str = "auto"  # "auto" (patients if >= 3, else slides), "patient" or "slide"
    only_folds: list[str] | None = None  # run only these folds (by test slide id); None = all
    ridge: bool = True  # fit the ridge baseline in the same run
    figures: bool = True  # write PNG figures (maps, per-gene PCC, Moran's I) into OUT/figures after training
    # after the folds, train the same way on every slide (panel, normalisation and validation blocks from
    # all of them) and write OUT/final/model.pt: the model for `gnnst predict` on new slides (no metrics:
    # nothing is held out, the folds' figures are its estimate)
    final_model: bool = True


ABLATION_SETTINGS = ["none", "k=4", "k=6", "k=8", "r=300", "r=450", "r=600"]  # default of AblationConfig.settings


@dataclass
class AblationConfig:
    settings: list[str] = field(default_factory=lambda: list(ABLATION_SETTINGS))  # neighbourhoods compared:
    #   "none" (model.use_graph=false), "k=<int>" (k nearest), "r=<µm>" (radius), "k=<int>,r=<µm>" (both)
    ensemble: int = 1  # models per fold in every setting (replaces train.ensemble; 1 keeps the run short)
    ridge: bool = True  # also report the graph-free ridge baseline (fitted once, in the first setting)
    keep_checkpoints: bool = False  # keep each setting's per-member last/best.pt (model.pt is always kept)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    seed: int = 0  # seed for every random choice
    num_workers: int = 0  # reserved for data loading processes


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML at ``path`` < dotted ``overrides``. Unknown keys raise, naming the key and file."""
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
    merged = _merge(merged, parse_overrides(overrides))
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
