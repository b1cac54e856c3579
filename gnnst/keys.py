"""Every AnnData key and PyG ``Data`` attribute name used by gnnst, spelled once.

AnnData keys follow scanpy/squidpy meanings so their tools run on our objects unchanged.
"""

# --- AnnData ------------------------------------------------------------------------------
SPATIAL = "spatial"  # obsm: [N, 2] full-resolution pixel (x, y); uns: scanpy's image dict
SLIDE_ID = "slide_id"  # obs: slide of each spot; squidpy's library_key
BARCODE = "barcode"  # obs index name: spot barcode / id, unique within a slide
COUNTS = "counts"  # layers: raw counts (X holds them too when read)
CONNECTIVITIES = "spatial_connectivities"  # obsp, squidpy's name
DISTANCES = "spatial_distances"  # obsp, squidpy's name
NEIGHBORS = "spatial_neighbors"  # uns, squidpy's name
PRED = "gnnst_pred"  # layers: predicted expression, same gene order as var
SD = "gnnst_sd"  # layers: spread (sd) of the ensemble members' predictions, same genes
CV_PCC = "gnnst_cv_pcc"  # var: the gene's cross-validated PCC, mean over held-out slides (NaN: none)
CV_PCC_SD = "gnnst_cv_pcc_sd"  # var: its sd over those slides
CV_PCC_NEW_PATIENT = "gnnst_cv_pcc_new_patient"  # var: its mean over the slides of patient-disjoint folds
RELIABLE = "gnnst_reliable"  # var: bool, CV_PCC >= the reliability threshold
OOD_SCORE = "gnnst_ood_score"  # obs: distance of the spot's patch embedding from the training spots (1 = typical)
OOD = "gnnst_ood"  # obs: bool, OOD_SCORE above the training spots' own quantile
UNS_GNNST = "gnnst"  # uns: version, config, metrics
MPP = "mpp"  # uns['gnnst'][MPP]: micrometres per full-resolution pixel
IMAGE_PATH = "image_path"  # uns['gnnst'][IMAGE_PATH]: the slide's image (full resolution, or Space Ranger's hires/lowres)
IMAGE_SCALEF = "image_scalef"  # uns['gnnst'][IMAGE_SCALEF]: pixels of that image per full-resolution pixel (1.0 if absent)
# uns['spatial'][<slide_id>], scanpy's Visium convention (squidpy's library_id = slide id)
IMAGES = "images"  # {'hires': [h, w, 3] uint8 image}
HIRES = "hires"  # the downsampled H&E under IMAGES
SCALEFACTORS = "scalefactors"  # {'tissue_hires_scalef', 'spot_diameter_fullres'}
HIRES_SCALEF = "tissue_hires_scalef"  # hires pixels per full-resolution pixel
SPOT_DIAMETER = "spot_diameter_fullres"  # spot diameter in full-resolution pixels
# SpatialData stores written by gnnst (gnnst.export.spatialdata): the table annotating the spots' shapes
SD_TABLE = "table"  # tables/<SD_TABLE>: the predictions (spatialdata-io's name)
SD_REGION = "region"  # obs of that table: the shapes element each row annotates (its region_key)
SD_INSTANCE = "instance_id"  # obs of that table: the row's shape in that element (its instance_key)


def img_key(encoder: str) -> str:
    """obsm key of one encoder's patch embeddings, ``[N, D]``."""
    return f"X_img_{encoder}"


# --- PyG Data (one per slide) -------------------------------------------------------------
# x          [N, D]  patch embedding (the input that exists at inference)
# y          [N, G]  normalised expression of the gene panel
# pos        [N, 2]  spot centre in micrometres
# pixel      [N, 2]  spot centre in full-resolution pixels (x, y)
# edge_index [2, E]  row 0 neighbour (source), row 1 centre spot (target)
# edge_attr  [E, 3]  (dx, dy, distance) in micrometres, source minus target
# slide_id   str
# barcodes   list[str]
# x_views    [V, N, D]  training only: view 0 = x, views 1.. stain-augmented embeddings (gnnst.graph.features)
# x_pick     [N] int64  training only, during an epoch: the view of x_views each spot takes (gnnst.train.views);
#                       a sampler reads a spot's row as x_views[x_pick[i], i], not x
DATA_X = "x"
DATA_Y = "y"
DATA_POS = "pos"
DATA_PIXEL = "pixel"
DATA_SLIDE = "slide_id"
DATA_BARCODES = "barcodes"
DATA_X_VIEWS = "x_views"
DATA_X_PICK = "x_pick"
