"""Patch encoders: the default ImageNet EfficientNet, pathology foundation models built from their
authors' recipes, any timm model, TorchScript modules; and where and how they run.

- :mod:`~gnnst.data.encoders.base`: :class:`PatchEncoder`, the registry, device / batch size /
  precision / threads.
- :mod:`~gnnst.data.encoders.recipes`: the foundation-model recipes (UNI, UNI2-h, H-optimus-0/1,
  Virchow2, Prov-GigaPath, Phikon-v2, CONCH v1.5) and their file layouts.
- :mod:`~gnnst.data.encoders.loading`: weights files read and checked tensor by tensor.
- :mod:`~gnnst.data.encoders.builders`: :func:`create_encoder`.
- :mod:`~gnnst.data.encoders.heads`: read-outs on a ViT trunk (imported when a recipe is built).

Importing this package imports neither torch nor timm.
"""

from gnnst.data.encoders.base import (CPU_BATCH_SIZE, CUDA_BATCH_SIZE, PRECISIONS, PatchEncoder, default_batch_size,
                                      default_num_workers, register_encoder, resolve_device, resolve_precision,
                                      set_cpu_threads)
from gnnst.data.encoders.builders import create_encoder, default_patch_um, fold_batchnorm, list_encoders, recipe_encoder
from gnnst.data.encoders.recipes import RECIPES, Recipe, get_recipe

__all__ = ["CPU_BATCH_SIZE", "CUDA_BATCH_SIZE", "PRECISIONS", "PatchEncoder", "RECIPES", "Recipe", "create_encoder",
           "default_batch_size", "default_patch_um", "default_num_workers", "fold_batchnorm", "get_recipe", "list_encoders",
           "recipe_encoder", "register_encoder", "resolve_device", "resolve_precision", "set_cpu_threads"]
