"""Model hyper-parameters (sizes that come from the data are not here).

Every component of :class:`~gnnst.models.gnnst.GNNST` has a switch, so each ablation is one
override (``model.use_graph=false``). Values are checked when the dataclass is built; a bad one
is a :class:`~gnnst.errors.GnnstError` naming the ``model.<key>`` and the value.
"""

from __future__ import annotations

from dataclasses import dataclass

from gnnst.errors import GnnstError

PREDICT_MODES = ("head", "retrieval", "blend")  # allowed values of ModelConfig.predict_mode


@dataclass
class ModelConfig:
    name: str = "gnnst"  # registered model name (gnnst.models.registry)
    hidden: int = 256  # width of every embedding inside the model
    proj_dim: int = 256  # width of the shared image/expression contrastive space (and retrieval bank)
    heads: int = 4  # attention heads per message-passing layer; must divide `hidden`
    num_layers: int = 2  # message-passing rounds = receptive field in hops (the last is the centre's
    #                      cross-attention read-out); keep train.num_hops >= num_layers
    dropout: float = 0.1  # dropout inside MLPs and on attention weights
    input_dropout: float = 0.1  # dropout on the patch embedding x before the query branch
    edge_scale_um: float = 200.0  # edge_attr (µm) is divided by this before the edge encoder (~ one ST spot pitch)
    edge_augment: bool = True  # training only: random rotation/reflection of (dx, dy); tissue has no fixed orientation
    # --- components (ablations) -----------------------------------------------------------
    use_graph: bool = True  # neighbour branch on/off; off = spot-only model and no neighbourhood-scale loss
    use_contrastive: bool = True  # gene branch + both InfoNCE losses; off = no shared space, predict uses the head
    use_neighbourhood_scale: bool = True  # neighbourhood-scale InfoNCE (acts only with use_graph and use_contrastive)
    use_masked_recon: bool = False  # cross-modal masked expression reconstruction (CMRCNet-style)
    mask_ratio: float = 0.5  # fraction of genes hidden per spot for the masked reconstruction
    # --- loss weights (compute_losses); a weight of 0 drops that term ---------------------
    w_mse: float = 1.0  # regression head vs y
    w_clip_spot: float = 1.0  # spot-scale InfoNCE, z_img vs z_gene
    w_clip_nbhd: float = 0.5  # neighbourhood-scale InfoNCE, z_img_nb vs z_gene_nb
    w_recon: float = 0.5  # masked reconstruction MSE on the hidden genes
    # --- prediction (GNNST.predict) --------------------------------------------------------
    predict_mode: str = "blend"  # "head", "retrieval" (bank of training spots) or "blend" of both
    retrieval_k: int = 50  # training spots averaged per query (softmax of similarity x logit scale)
    blend_alpha: float = 0.5  # weight of the regression head in "blend"; 1 - alpha goes to retrieval

    def __post_init__(self) -> None:
        def bad(key: str, want: str) -> GnnstError:
            return GnnstError(f"config key 'model.{key}': expected {want}, got {getattr(self, key)!r}")

        for key in ("hidden", "proj_dim", "heads", "num_layers", "retrieval_k"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        if self.hidden % self.heads:
            raise GnnstError(
                f"config key 'model.heads': {self.heads} does not divide model.hidden={self.hidden}"
            )
        for key in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "a value in [0, 1)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise bad("mask_ratio", "a value in (0, 1)")
        if not self.edge_scale_um > 0:
            raise bad("edge_scale_um", "a positive number of micrometres")
        for key in ("w_mse", "w_clip_spot", "w_clip_nbhd", "w_recon"):
            if getattr(self, key) < 0:
                raise bad(key, "a weight >= 0")
        if self.predict_mode not in PREDICT_MODES:
            raise bad("predict_mode", f"one of {', '.join(PREDICT_MODES)}")
        if not 0.0 <= self.blend_alpha <= 1.0:
            raise bad("blend_alpha", "a value in [0, 1]")
