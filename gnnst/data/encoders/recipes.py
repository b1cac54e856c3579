"""Pathology foundation models, each built exactly as its authors build it: ``encoder.name=uni
encoder.checkpoint=/path/pytorch_model.bin`` is all a user writes.

A :class:`Recipe` states the timm architecture and its arguments, the input size, the normalisation,
the pooling and output width, the µm per pixel the model was trained at (hence the default patch
side), the layout of the weights file the authors distribute, the licence and the download page.
Each value was read from the authors' model card and loading code (cited beside each recipe); the
weights are gated and never downloaded by gnnst.

Layouts of the authors' files (``Recipe.layout``):

- ``timm``: a plain state dict in timm's names, no prefix (UNI, UNI2-h, H-optimus-0/1, Virchow2,
  Prov-GigaPath): loaded into the timm model as it is.
- ``hf-dinov2``: Hugging Face ``transformers`` ``Dinov2Model`` names (Phikon-v2). gnnst does not depend
  on ``transformers``: the tensors are renamed onto the same network in timm (:func:`hf_dinov2_to_timm`;
  query/key/value are stacked into timm's fused ``qkv``, ``embeddings.mask_token``, used only by masked
  pre-training, is dropped). At the 224-px input both compute the same function.
- ``conch-v1.5``: the vision tower of CONCH v1.5 as TRIDENT and TITAN distribute it
  (``pytorch_model_vision.bin``: ``trunk.*`` a timm ViT-L/16 at 224, ``attn_pool_contrast.*`` an
  attentional pooler, ``ln_contrast.*``). The pooler is :class:`AttentionalPooler`; the 14 x 14
  position embedding is resampled once to the 28 x 28 grid of the 448-px input exactly as the authors'
  forward pass does on every call (:func:`dino_resample_pos_embed`).

Every recipe here can be built from timm plus the modules of this file; none needs a package outside
gnnst's dependencies.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Class-valued timm arguments are written as dotted names and imported when the model is built (so
# that this table, and `encoder.timm_kwargs` in YAML, stay plain data); only these modules are allowed.
CLASS_MODULES = ("timm.layers", "torch.nn")


@dataclass(frozen=True)
class Recipe:
    """How one foundation model is built, fed and read out.

    Attributes:
        name: the ``encoder.name`` that selects it.
        title: model and authors.
        arch: timm architecture name.
        timm_kwargs: arguments of ``timm.create_model`` (class values as dotted names, see
            :data:`CLASS_MODULES`).
        input_size: side of the square input in pixels.
        mean, std: per-channel normalisation of [0, 1] RGB.
        interpolation: resampling of a patch to the input size (``bilinear`` or ``bicubic``).
        pooling: ``cls`` (the class token after the final norm), ``cls+mean`` (class token
            concatenated with the mean of the patch tokens, registers excluded) or ``attn-pool``
            (CONCH's attentional pooler and layer norm).
        dim: output width.
        mpp: µm per pixel of the training patches; ``patch_um = input_size * mpp`` is the default patch side.
        layout: the file layout (module docstring).
        files: what the authors distribute.
        licence: its licence, in short.
        url: where a user requests and downloads it.
        source: where the values above were read.
        revision: bumped when gnnst changes how the recipe computes (invalidates cached embeddings).
    """

    name: str
    title: str
    arch: str
    timm_kwargs: Mapping[str, Any]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    pooling: str
    dim: int
    mpp: float
    layout: str
    files: str
    licence: str
    url: str
    source: str
    revision: int = 1
    notes: str = field(default="")

    @property
    def patch_um(self) -> float:
        """Default patch side in µm: the input size at the training resolution."""
        return self.input_size * self.mpp


_TRIDENT = "https://github.com/mahmoodlab/TRIDENT/blob/main/trident/patch_encoder_models/load.py"
_HEST = "HEST-Benchmark (Jaume et al. 2024) feeds every encoder 224 x 224 px patches at 0.5 µm/px (112 µm)"

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    # UNI: model card https://huggingface.co/MahmoodLab/UNI (timm.create_model("vit_large_patch16_224",
    # img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True), strict load of
    # pytorch_model.bin, Resize(224) + ImageNet normalisation); same in TRIDENT's UNIInferenceEncoder.
    Recipe(
        name="uni", title="UNI (Mahmood Lab)", arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                     "dynamic_img_size": True},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", pooling="cls", dim=1024,
        mpp=0.5, layout="timm", files="pytorch_model.bin: torch state dict, timm names, no prefix (1.2 GB)",
        licence="CC-BY-NC-ND-4.0, gated (non-commercial academic research)",
        url="https://huggingface.co/MahmoodLab/UNI", source=f"model card; {_TRIDENT}",
        notes="trained on Mass-100K at 20x (0.5 µm/px); " + _HEST),
    # UNI2-h: model card https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs listed there: ViT-H/14,
    # 24 blocks of width 1536, SwiGLU MLP, 8 register tokens, no position embedding for the class token).
    Recipe(
        name="uni2-h", title="UNI2-h (Mahmood Lab)", arch="vit_giant_patch14_224",
        timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                     "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                     "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
                     "dynamic_img_size": True},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", pooling="cls", dim=1536,
        mpp=0.5, layout="timm", files="pytorch_model.bin: torch state dict, timm names, no prefix (2.7 GB)",
        licence="CC-BY-NC-ND-4.0, gated (non-commercial academic research)",
        url="https://huggingface.co/MahmoodLab/UNI2-h", source=f"model card; {_TRIDENT}",
        notes="681 M parameters; " + _HEST),
    # H-optimus-0: config.json https://huggingface.co/bioptimus/H-optimus-0/blob/main/config.json
    # (vit_giant_patch14_reg4_dinov2, input 224, global_pool token, mean/std below); model card:
    # timm.create_model("hf-hub:bioptimus/H-optimus-0", pretrained=True, init_values=1e-5,
    # dynamic_img_size=False); patches of 224 px at 0.5 µm/px.
    Recipe(
        name="h-optimus-0", title="H-optimus-0 (Bioptimus)", arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0,
                     "global_pool": "token"},
        input_size=224, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        interpolation="bilinear", pooling="cls", dim=1536, mpp=0.5, layout="timm",
        files="pytorch_model.bin: torch state dict, timm names, no prefix (4.5 GB)",
        licence="Apache-2.0", url="https://huggingface.co/bioptimus/H-optimus-0",
        source=f"model card and config.json; {_TRIDENT}", notes="1.1 B parameters"),
    # Virchow2: model card https://huggingface.co/paige-ai/Virchow2 (timm.create_model(..., mlp_layer=
    # SwiGLUPacked, act_layer=SiLU); vit_huge_patch14_224 with reg_tokens=4, mlp_ratio=5.3375, global_pool="";
    # embedding = concat(class token, mean of the 256 patch tokens: output[:, 5:]) -> 2560; bicubic resize).
    Recipe(
        name="virchow2", title="Virchow2 (Paige)", arch="vit_huge_patch14_224",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
                     "global_pool": "", "dynamic_img_size": True, "mlp_layer": "timm.layers.SwiGLUPacked",
                     "act_layer": "torch.nn.SiLU"},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", pooling="cls+mean",
        dim=2560, mpp=0.5, layout="timm",
        files="pytorch_model.bin or model.safetensors: timm names, no prefix (2.5 GB)",
        licence="CC-BY-NC-ND-4.0, gated (non-commercial)", url="https://huggingface.co/paige-ai/Virchow2",
        source=f"model card; {_TRIDENT}",
        notes="632 M parameters; trained on tiles at 5x-40x; 20x (0.5 µm/px) as in the card's examples"),
    # Prov-GigaPath tile encoder: config.json of https://huggingface.co/prov-gigapath/prov-gigapath
    # (vit_giant_patch14_dinov2 with patch 16, 40 blocks of width 1536, mlp_ratio 5.33334, init_values 1e-5);
    # card: Resize(256, bicubic) + CenterCrop(224) of 256-px tiles at 0.5 µm/px, i.e. the central 112 µm.
    Recipe(
        name="prov-gigapath", title="Prov-GigaPath tile encoder (Providence, Microsoft)",
        arch="vit_giant_patch14_dinov2",
        timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                     "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", pooling="cls", dim=1536,
        mpp=0.5, layout="timm", files="pytorch_model.bin: torch state dict, timm names, no prefix (4.5 GB)",
        licence="Apache-2.0 with the Prov-GigaPath access terms (research use only)",
        url="https://huggingface.co/prov-gigapath/prov-gigapath", source=f"model card and config.json; {_TRIDENT}",
        notes="1.1 B parameters; the slide encoder is not used"),
    # Phikon-v2: config.json https://huggingface.co/owkin/phikon-v2/blob/main/config.json (Dinov2Model,
    # hidden 1024, 24 layers, 16 heads, patch 16, image 224, layer-norm eps 1e-6, GELU, no registers);
    # card: features = last_hidden_state[:, 0, :] (the class token after the final layer norm).
    Recipe(
        name="phikon-v2", title="Phikon-v2 (Owkin)", arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1.0, "num_classes": 0},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", pooling="cls", dim=1024,
        mpp=0.5, layout="hf-dinov2",
        files="model.safetensors (+ config.json): Hugging Face transformers Dinov2Model names (1.2 GB)",
        licence="Owkin non-commercial licence", url="https://huggingface.co/owkin/phikon-v2",
        source=f"model card and config.json; {_TRIDENT}",
        notes="trained on PANCAN-XL tiles at 20x (0.5 µm/px)"),
    # CONCH v1.5 vision tower: TRIDENT's conchv1_5.py (CONCHVisionTower: ViT-L/16 trunk with init_values=1.0
    # built at 224, AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1), LayerNorm(768);
    # pytorch_model_vision.bin loaded strictly; Resize(448, bilinear) + CenterCrop(448), ImageNet mean/std);
    # model page https://huggingface.co/MahmoodLab/conchv1_5.
    Recipe(
        name="conch-v1.5", title="CONCH v1.5 vision encoder (Mahmood Lab)", arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 448, "patch_size": 16, "init_values": 1.0, "num_classes": 0, "global_pool": ""},
        input_size=448, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", pooling="attn-pool",
        dim=768, mpp=0.5, layout="conch-v1.5",
        files="pytorch_model_vision.bin: trunk.* (timm ViT-L/16 at 224), attn_pool_contrast.*, ln_contrast.*",
        licence="CC-BY-NC-ND-4.0, gated (non-commercial academic research)",
        url="https://huggingface.co/MahmoodLab/conchv1_5",
        source="https://github.com/mahmoodlab/TRIDENT/blob/main/trident/patch_encoder_models/model_zoo/conchv1_5/"
               "conchv1_5.py",
        notes="448-px input at 20x; HEST-Benchmark resizes 112-µm patches to 448 instead"),
]}


# H-optimus-1: same architecture, input and normalisation as H-optimus-0 (model card
# https://huggingface.co/bioptimus/H-optimus-1; TRIDENT's HOptimus1InferenceEncoder).
RECIPES["h-optimus-1"] = replace(
    RECIPES["h-optimus-0"], name="h-optimus-1", title="H-optimus-1 (Bioptimus)",
    licence="gated; academic research use only (Bioptimus terms on the model page)",
    url="https://huggingface.co/bioptimus/H-optimus-1", source=f"model card; {_TRIDENT}")


def get_recipe(name: str) -> Recipe | None:
    return RECIPES.get(name)


def resolve_kwargs(kwargs: Mapping[str, Any], *, where: str) -> dict:
    """``kwargs`` with dotted class names (``"timm.layers.SwiGLUPacked"``) replaced by the classes."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v.startswith(tuple(m + "." for m in CLASS_MODULES)):
            module, _, attr = v.rpartition(".")
            try:
                v = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                raise GnnstError(f"{where}: '{k}: {v}' names no class in {module}") from None
        out[k] = v
    return out


def build_network(recipe: Recipe, *, overrides: Mapping[str, Any] | None = None, device: str = "meta") -> "nn.Module":
    """The recipe's network (timm trunk plus its read-out, :mod:`gnnst.data.encoders.heads`) on
    ``device`` (``meta``: no memory, no initialisation), in eval mode.

    ``overrides`` change timm arguments (tests shrink ``depth``); a user never sets them.
    """
    import timm
    import torch

    from gnnst.data.encoders.heads import ConchVisionTower, TokenReadout

    kwargs = resolve_kwargs({**recipe.timm_kwargs, **(overrides or {})}, where=f"encoder '{recipe.name}'")
    with torch.device(device):
        trunk = timm.create_model(recipe.arch, pretrained=False, **kwargs)
        net = ConchVisionTower(trunk) if recipe.pooling == "attn-pool" else TokenReadout(trunk, recipe.pooling)
    return net.eval()


# --------------------------------------------------------------------------------------------
# File layouts: what the authors' file holds (names, shapes) and how it maps onto the network


def file_layout(recipe: Recipe, net: "nn.Module") -> dict[str, tuple]:
    """Name -> shape of the tensors the authors' file holds for ``net`` (built by :func:`build_network`)."""
    from gnnst.data.encoders.loading import model_layout

    if recipe.layout == "timm":
        return {k[len("trunk."):]: s for k, s in model_layout(net).items()}
    if recipe.layout == "hf-dinov2":
        return hf_dinov2_layout(net.trunk)
    if recipe.layout == "conch-v1.5":
        out = model_layout(net)
        d = out["trunk.pos_embed"][-1]
        out["trunk.pos_embed"] = (1, 1 + (224 // 16) ** 2, d)  # the trunk was trained at 224 px
        return out
    raise GnnstError(f"encoder '{recipe.name}': unknown layout '{recipe.layout}'")


def to_network(recipe: Recipe, state: dict) -> dict:
    """The file's tensors (already checked against :func:`file_layout`) in ``net``'s names and shapes."""
    if recipe.layout == "timm":
        return {f"trunk.{k}": v for k, v in state.items()}
    if recipe.layout == "hf-dinov2":
        return {f"trunk.{k}": v for k, v in hf_dinov2_to_timm(state).items()}
    if recipe.layout == "conch-v1.5":
        state = dict(state)
        grid = recipe.input_size // 16
        state["trunk.pos_embed"] = dino_resample_pos_embed(state["trunk.pos_embed"], grid)
        return state
    raise GnnstError(f"encoder '{recipe.name}': unknown layout '{recipe.layout}'")


def hf_dinov2_layout(trunk: "nn.Module") -> dict[str, tuple]:
    """The ``transformers`` ``Dinov2Model`` state dict (names, shapes) of the network ``trunk`` computes."""
    d = trunk.embed_dim
    n_pos = trunk.pos_embed.shape[1]
    hidden = trunk.blocks[0].mlp.fc1.out_features
    p = trunk.patch_embed.patch_size[0]
    out = {"embeddings.cls_token": (1, 1, d), "embeddings.mask_token": (1, d),
           "embeddings.position_embeddings": (1, n_pos, d),
           "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
           "embeddings.patch_embeddings.projection.bias": (d,)}
    for i in range(len(trunk.blocks)):
        L = f"encoder.layer.{i}."
        out.update({L + "norm1.weight": (d,), L + "norm1.bias": (d,)})
        for part in ("query", "key", "value"):
            out.update({L + f"attention.attention.{part}.weight": (d, d), L + f"attention.attention.{part}.bias": (d,)})
        out.update({L + "attention.output.dense.weight": (d, d), L + "attention.output.dense.bias": (d,),
                    L + "layer_scale1.lambda1": (d,), L + "norm2.weight": (d,), L + "norm2.bias": (d,),
                    L + "mlp.fc1.weight": (hidden, d), L + "mlp.fc1.bias": (hidden,),
                    L + "mlp.fc2.weight": (d, hidden), L + "mlp.fc2.bias": (d,), L + "layer_scale2.lambda1": (d,)})
    out.update({"layernorm.weight": (d,), "layernorm.bias": (d,)})
    return out


_HF_RENAMES = [  # (transformers Dinov2Model name, timm VisionTransformer name), regular expressions
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm(\d)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc\d)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def hf_dinov2_to_timm(state: dict) -> dict:
    """``Dinov2Model`` tensors -> timm ``VisionTransformer`` tensors (same network).

    ``query``, ``key`` and ``value`` are stacked in that order into timm's ``qkv`` (timm splits its fused
    projection as ``[q; k; v]``); ``embeddings.mask_token`` (masked-image pre-training only) is dropped.
    """
    import torch

    out, qkv = {}, {}
    for k, v in state.items():
        if k == "embeddings.mask_token":
            continue
        m = _HF_QKV.fullmatch(k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
            continue
        for pat, rep in _HF_RENAMES:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise GnnstError(f"Dinov2 tensor '{k}' has no timm counterpart")
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def dino_resample_pos_embed(pos: "torch.Tensor", grid: int) -> "torch.Tensor":
    """A ``[1, 1 + n*n, D]`` position embedding (class token first) on a ``grid`` x ``grid`` patch grid,
    computed as DINO / iBOT / CONCH's ``interpolate_pos_encoding`` does at every forward pass: bicubic
    with scale factor ``(grid + 0.1) / n`` (not ``grid / n``), class position kept."""
    import torch
    import torch.nn.functional as F

    n = int(math.isqrt(pos.shape[1] - 1))
    if n * n != pos.shape[1] - 1:
        raise GnnstError(f"position embedding of {pos.shape[1] - 1} patches is not a square grid")
    if n == grid:
        return pos
    d = pos.shape[-1]
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    scale = (grid + 0.1) / n
    patch_pos = F.interpolate(patch_pos.reshape(1, n, n, d).permute(0, 3, 1, 2).float(), scale_factor=(scale, scale),
                              mode="bicubic")  # [1, D, grid, grid]
    if patch_pos.shape[-1] != grid:
        raise GnnstError(f"position embedding resampled to {patch_pos.shape[-1]} px, expected {grid}")
    return torch.cat([cls_pos.float(), patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)
