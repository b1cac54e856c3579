"""Cross-validation folds from a manifest: by patient where patients are known, else by slide."""

from __future__ import annotations

from dataclasses import dataclass

from gnnst.errors import GnnstError


@dataclass
class Fold:
    """One fold: ``test_slides`` are held out; ``patient_disjoint`` says no test patient is in training."""

    name: str
    train_slides: list[str]
    test_slides: list[str]
    patient_disjoint: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "train_slides": self.train_slides, "test_slides": self.test_slides,
                "patient_disjoint": self.patient_disjoint}


def make_folds(slide_patients: dict[str, str], *, mode: str = "auto") -> list[Fold]:
    """Folds over slides given as ``{slide_id: patient_id}``.

    Args:
        slide_patients: every slide of the dataset and its patient.
        mode: ``"patient"`` (leave one patient out), ``"slide"`` (leave one slide out), or ``"auto"``:
            by patient when at least three patients exist, otherwise by slide. Slide folds whose test
            patient has no other slide are marked patient-disjoint.
    """
    patients: dict[str, list[str]] = {}
    for s, p in slide_patients.items():
        patients.setdefault(p, []).append(s)
    if mode == "auto":
        mode = "patient" if len(patients) >= 3 else "slide"
    if mode not in ("patient", "slide"):
        raise GnnstError(f"config key 'eval.folds': unknown value '{mode}' (auto, patient or slide)")
    folds = []
    if mode == "patient":
        if len(patients) < 2:
            raise GnnstError(f"leave-one-patient-out needs at least 2 patients, found {len(patients)}")
        for p, test in patients.items():
            train = [s for s in slide_patients if s not in test]
            folds.append(Fold(name=f"patient_{p}", train_slides=train, test_slides=list(test), patient_disjoint=True))
    else:
        if len(slide_patients) < 2:
            raise GnnstError("cross-validation needs at least 2 slides")
        for s, p in slide_patients.items():
            train = [t for t in slide_patients if t != s]
            disjoint = all(slide_patients[t] != p for t in train)
            folds.append(Fold(name=s, train_slides=train, test_slides=[s], patient_disjoint=disjoint))
    return folds
