"""An ensemble of one registered model, its head/retrieval blend chosen on validation spots, packaged as
the :class:`~gnnst.predictor.TrainedModel` that prediction loads, with what says how far to trust it
(:mod:`gnnst.reliability`): the scale of the members' spread fitted on the same validation spots, and a
reference of the training slides' features for out-of-distribution scores."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gnnst.config import Config
    from gnnst.predictor import EncoderInfo, TrainedModel
    from gnnst.reliability import Calibration
    from gnnst.train.prepare import TrainingSet
    from gnnst.train.trainer import FitResult

log = logging.getLogger("gnnst")

BLEND_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # weights of the regression head tried on the validation spots


@dataclass
class EnsembleFit:
    """What :func:`fit_ensemble` produced.

    Attributes:
        model: the trained model (members, blend weight, panel, scaling, ...).
        fits: each member's :class:`~gnnst.train.trainer.FitResult`.
        val_score: validation score of the ensemble at the chosen blend weight.
        blend_scores: validation score per blend weight tried (empty when none was chosen).
        train_wall_seconds: wall time from the first member's start to the last one's end (training and
            validation predictions, one after the other or side by side); ``None`` when the members were
            trained elsewhere (read from files).
    """

    model: "TrainedModel"
    fits: list["FitResult"]
    val_score: float
    blend_scores: dict[float, float] = field(default_factory=dict)
    train_wall_seconds: float | None = None


def choose_blend(cfg: "Config", modes: tuple[str, ...], val_preds: dict, val_y: list[np.ndarray]
                 ) -> tuple[float, dict[float, float]]:
    """The weight ``alpha`` of the head (``1 - alpha`` on retrieval) and the scores it was chosen by.

    Models with one prediction mode take it (head: 1, retrieval: 0). Models with both choose among
    :data:`BLEND_ALPHAS` on the validation spots when ``train.select_blend``; otherwise the model's own
    ``predict_mode`` / ``blend_alpha`` apply. ``val_preds``: ``{mode: [n_s, G] per validation graph}`` at
    its validation spots (the rows of ``val_y``), averaged over the members.
    """
    from gnnst.models.base import blend
    from gnnst.train.trainer import validation_score

    if modes == ("head",):
        return 1.0, {}
    if modes == ("retrieval",):
        return 0.0, {}
    if cfg.train.select_blend and sum(len(v) for v in val_y) > 1:
        scores = {a: validation_score(val_y, [blend(h, r, a) for h, r in zip(val_preds["head"], val_preds["retrieval"])])
                  for a in BLEND_ALPHAS}
        alpha = max(scores, key=lambda a: (scores[a], a))
        log.info("blend weight of the head chosen on validation spots: %s (scores %s)", alpha,
                 {a: round(v, 4) for a, v in scores.items()})
        return alpha, scores
    return {"head": 1.0, "retrieval": 0.0}.get(cfg.model.predict_mode, cfg.model.blend_alpha), {}


def fit_calibration(val_members: list[dict], val_y: list[np.ndarray], modes: tuple[str, ...], alpha: float,
                    level: float) -> "Calibration | None":
    """The spread's scale (:meth:`gnnst.reliability.Calibration.fit`) on the validation spots: each member's
    prediction there (``val_members[i][mode]``: ``[n_val, G]`` per validation graph, standardised) blended
    at ``alpha`` as :meth:`TrainedModel.predict` blends it, against ``val_y`` (standardised; the ratio of
    error to sd is the same in expression units, per gene). ``None`` for one member or no validation spot."""
    from gnnst.models.base import blend
    from gnnst.reliability import Calibration, ensemble_sd

    if len(val_members) < 2 or not val_y or sum(len(v) for v in val_y) == 0:
        return None
    per = []
    for vm in val_members:
        parts = vm[modes[0]] if len(modes) == 1 else [blend(h, r, alpha) for h, r in zip(vm["head"], vm["retrieval"])]
        per.append(np.concatenate(parts))
    stack = np.stack(per)  # [M, n_val, G]
    return Calibration.fit(np.concatenate(val_y).astype(np.float32), stack.mean(0), ensemble_sd(stack), level=level,
                           members=len(per))


MEMBER_FILE = "member.pt"  # a trained member handed from the rank that trained it to its fold's owner
MEMBER_FORMAT = "gnnst-member-1"


def member_dir(fdir: Path, i: int) -> Path:
    """Member ``i``'s folder in the fold folder ``fdir``: its checkpoints, and its hand-over file
    (:func:`member_file`)."""
    return fdir / f"member{i}"


def member_file(fdir: Path, i: int) -> Path:
    """Where member ``i`` of the fold folder ``fdir`` is handed over (:func:`save_member`, :func:`load_member`)."""
    return member_dir(fdir, i) / MEMBER_FILE


def fit_member(cfg: "Config", ts: "TrainingSet", fdir: Path, i: int, *, resume: bool, device, progress: bool
               ) -> tuple:
    """Train member ``i`` (seed ``cfg.seed + i``) on ``ts`` (checkpoints in ``fdir/member<i>``):
    ``(FitResult, state dict on the CPU, prediction modes, {mode: [[n_s, G] per validation graph]})``, the
    predictions at the validation spots only (``ts.val_masks``; the rest of the slides is their halo)."""
    import torch

    from gnnst.models import create_model
    from gnnst.predictor import predict_graphs
    from gnnst.train.trainer import default_batch_nodes, fit, validation_loader

    tc = cfg.train
    mcfg = dataclasses.replace(cfg, seed=cfg.seed + i)
    torch.manual_seed(mcfg.seed)
    model = create_model(cfg.model.name, in_dim=ts.in_dim, num_genes=len(ts.panel.genes), cfg=cfg.model)
    res = fit(model, ts.train, ts.val, ts.val_masks, mcfg, ckpt_dir=member_dir(fdir, i), resume=resume,
              device=device, progress=progress)
    modes = tuple(model.prediction_modes)
    val = predict_graphs(model, ts.val, modes=modes, batch_nodes=tc.batch_nodes or default_batch_nodes(device),
                         num_hops=tc.num_hops, device=device, masks=ts.val_masks,
                         loader=validation_loader(model, ts.val, ts.val_masks, cfg, device))
    return res, {k: v.detach().cpu() for k, v in model.state_dict().items()}, modes, val


def save_member(path: Path, member: tuple) -> None:
    """Write :func:`fit_member`'s result (plain tensors, lists and numbers: read with ``weights_only``)."""
    import torch

    from gnnst.io import atomic_torch_save

    res, state, modes, val = member
    atomic_torch_save({"format": MEMBER_FORMAT, "fit": dataclasses.asdict(res), "state": state, "modes": list(modes),
                       "val": {m: [torch.from_numpy(np.ascontiguousarray(a)) for a in v] for m, v in val.items()}},
                      path)


def load_member(path: Path) -> tuple:
    """:func:`save_member`'s file back as :func:`fit_member`'s tuple; a missing or foreign file is a
    one-line error."""
    import torch

    from gnnst.errors import GnnstError
    from gnnst.train.trainer import FitResult

    if not path.is_file():
        raise GnnstError(f"{path}: missing (its rank did not finish, or the output folder is not on a "
                         f"filesystem every rank sees)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's own message is several lines: the type says enough
        raise GnnstError(f"{path}: not a trained member of this run (not a file of plain tensors and numbers: "
                         f"{type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != MEMBER_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise GnnstError(f"{path}: not a trained member of this run (format {got!r}, expected {MEMBER_FORMAT!r})")
    try:
        return (FitResult(**d["fit"]), d["state"], tuple(d["modes"]),
                {m: [t.numpy() for t in v] for m, v in d["val"].items()})
    except Exception as e:  # noqa: BLE001 - a damaged file of the right format
        raise GnnstError(f"{path}: a damaged trained member ({type(e).__name__}: {e})") from None


def member_processes(cfg: "Config", n: int, device) -> tuple[int, int]:
    """How ``n`` members are trained here: ``(processes side by side, torch threads each)``. On a CPU,
    outside torchrun, ``train.member_procs`` processes (null: one per member when training has two threads
    or more) share this process's threads, at least one each: a small model's step scales poorly over
    threads, so members side by side at one thread each finish sooner than one after the other at all
    of them. Else ``(1, this process's threads)``: one at a time (on CUDA, under torchrun, one member, or off
    Linux: the members are forked, and ``fork`` is unsafe on macOS and absent on Windows)."""
    import sys

    import torch

    from gnnst.train.distributed import current

    threads = torch.get_num_threads()
    if (getattr(device, "type", str(device)) != "cpu" or current().world_size > 1 or n < 2
            or not sys.platform.startswith("linux")):
        return 1, threads
    want = cfg.train.member_procs
    procs = min(n, want if want is not None else (n if threads >= 2 else 1))
    return procs, max(1, threads // procs) if procs > 1 else threads


_FORKED: dict = {}  # what a forked member process trains on: set by fit_members_forked around its pool


def _forked_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _forked_member(i: int) -> str:
    """In a forked process: train member ``i`` on the parent's training set and write it to its file."""
    cfg, ts, fdir, resume, device = (_FORKED[k] for k in ("cfg", "ts", "fdir", "resume", "device"))
    path = member_file(fdir, i)
    save_member(path, fit_member(cfg, ts, fdir, i, resume=resume, device=device, progress=False))
    return str(path)


def fit_members_forked(cfg: "Config", ts: "TrainingSet", fdir: Path, members: list[int], *, procs: int,
                       threads: int, resume: bool, device, progress: bool) -> dict[int, tuple]:
    """:func:`fit_member` for each of ``members``, ``procs`` at a time in forked processes of ``threads``
    torch threads (:func:`member_processes`). They share ``ts`` with this process (forked: nothing is
    copied or pickled; its file-backed arrays stay mapped) and hand their result back through
    ``fdir/member<i>/member.pt`` (:func:`save_member`, as torchrun's ranks do). Each member's result is
    the one it gets trained alone at ``threads`` threads (its seed is its own). ``{member: fit_member's
    tuple}``; a member that fails raises here, a process that dies is a one-line error."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    from gnnst.errors import GnnstError

    log.info("members %s: %d side by side (forked processes, %d torch thread%s each; train.member_procs)",
             members, procs, threads, "" if threads == 1 else "s")
    for i in members:
        member_dir(fdir, i).mkdir(parents=True, exist_ok=True)
    _FORKED.update(cfg=cfg, ts=ts, fdir=fdir, resume=resume, device=device)
    try:
        with ProcessPoolExecutor(max_workers=procs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_forked_init, initargs=(threads,)) as pool:
            jobs = {pool.submit(_forked_member, i): i for i in members}
            bar = tqdm(total=len(members), desc="members", unit="model", disable=not progress, leave=False)
            try:
                for job in as_completed(jobs):
                    job.result()
                    bar.update()
            finally:
                bar.close()
    except BrokenProcessPool:
        raise GnnstError(f"{fdir}: a process training an ensemble member died (killed, out of memory?); "
                         f"train.member_procs=1 trains them one at a time in this process") from None
    finally:
        _FORKED.clear()
    got = {}
    for i in members:  # a hand-over only: the fold's model.pt holds the states
        got[i] = load_member(member_file(fdir, i))
        member_file(fdir, i).unlink()
    return got


def fit_ensemble(cfg: "Config", ts: "TrainingSet", fdir: Path, *, fold: dict, encoder: "EncoderInfo",
                 resume: bool, device, progress: bool, from_files: bool = False) -> EnsembleFit:
    """Train ``cfg.train.ensemble`` models ``cfg.model.name`` (seeds ``cfg.seed + i``) on ``ts`` through
    :func:`gnnst.train.trainer.fit` (checkpoints in ``fdir/member<i>``), choose the blend weight on the
    validation spots (:func:`choose_blend`), and package them as a :class:`~gnnst.predictor.TrainedModel`
    (``fold``: its ``{'name', 'train_slides', 'test_slides', 'patient_disjoint'}``) with its
    :class:`~gnnst.reliability.Calibration` (fitted on the validation spots; two members or more) and
    :class:`~gnnst.reliability.OODReference` (the training slides' features).

    ``from_files``: the members were trained already, by whichever ranks (folds spread over torchrun's
    ranks, :func:`gnnst.eval.crossval.run_crossval`), and are read from ``fdir/member<i>/member.pt``."""
    from gnnst.models.base import blend
    from gnnst.predictor import TrainedModel
    from gnnst.reliability import OODReference
    from gnnst.train.distributed import gather, my_share
    from gnnst.train.trainer import default_batch_nodes, validation_score

    tc = cfg.train
    batch_nodes = tc.batch_nodes or default_batch_nodes(device)
    t0 = time.perf_counter()
    if from_files:
        members = [load_member(member_file(fdir, i)) for i in range(tc.ensemble)]
    else:
        share = my_share(tc.ensemble, tc.distributed)  # under torchrun "folds": this rank's members only
        procs, threads = member_processes(cfg, len(share), device)
        if procs > 1:
            local = fit_members_forked(cfg, ts, fdir, share, procs=procs, threads=threads, resume=resume,
                                       device=device, progress=progress)
        else:
            local = {i: fit_member(cfg, ts, fdir, i, resume=resume, device=device, progress=progress) for i in share}
        members = gather(local, tc.ensemble, tc.distributed)  # member order, as in one process
    wall = None if from_files else time.perf_counter() - t0
    fits, states, modes, val_sum, val_members = [], [], None, None, []
    for res, state, member_modes, v in members:
        fits.append(res)
        states.append(state)
        modes = modes or member_modes
        val_sum = v if val_sum is None else {m: [a + b for a, b in zip(val_sum[m], v[m])] for m in modes}
        val_members.append(v)  # at the validation spots
    n = len(fits)
    val_avg = {m: [a / n for a in val_sum[m]] for m in modes}
    val_y = [g.y.numpy()[mk] for g, mk in zip(ts.val, ts.val_masks)]
    alpha, scores = choose_blend(cfg, modes, val_avg, val_y)
    mixed = val_avg[modes[0]] if len(modes) == 1 else \
        [blend(h, r, alpha) for h, r in zip(val_avg["head"], val_avg["retrieval"])]
    val_score = validation_score(val_y, mixed) if val_y else float("nan")
    tm = TrainedModel(model_name=cfg.model.name, model_config=cfg.model, in_dim=ts.in_dim, encoder=encoder,
                      patch_size_um=cfg.patch.size_um, panel=ts.panel, expression=cfg.expression, scaler=ts.scaler,
                      graph=cfg.graph, batch_nodes=batch_nodes, num_hops=tc.num_hops, states=states,
                      blend_alpha=alpha, fold=dict(fold), reliability=cfg.reliability, protocol=ts.protocol,
                      feature_norm=ts.feature_norm)
    tm.calibration = fit_calibration(val_members, val_y, modes, alpha, cfg.reliability.interval_level)
    rc = cfg.reliability
    train_graphs = [ts.graphs[s] for s in ts.train_slides]  # their features one slide at a time: only the sample kept
    tm.ood_reference = OODReference.build([functools.partial(tm.features, g) for g in train_graphs],
                                          sizes=[g.num_nodes for g in train_graphs], k=rc.ood_k,
                                          quantile=rc.ood_quantile, cap=rc.ood_reference, seed=cfg.seed)
    log.info("reliability: spread scale %s on %s validation values; OOD reference of %d of %d training spots "
             "(%.1f MB), threshold %.3f", "none (one member)" if tm.calibration is None else
             f"{tm.calibration.scale:.3f}", "no" if tm.calibration is None else tm.calibration.n_values,
             len(tm.ood_reference.features), tm.ood_reference.n_train, tm.ood_reference.nbytes / 1e6,
             tm.ood_reference.threshold)
    return EnsembleFit(model=tm, fits=fits, val_score=val_score, blend_scores=scores, train_wall_seconds=wall)
