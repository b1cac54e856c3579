import hashlib
import shutil

import pytest

from gnnst_testdata import write_legacy_slide, write_manifest
from gnnst.data.manifest import load_manifest, resolve_files
from gnnst.errors import GnnstError


def test_her2st_manifest_is_valid():
    from gnnst_testdata import REPO

    m = load_manifest(REPO / "data_manifests" / "her2st.yaml")
    assert m.slide_ids == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert {s.patient_id for s in m.slides} == {"B", "C"}
    for s in m.slides:
        assert set(s.files) == {"counts", "spots", "image"}
        assert all(len(f.sha256) == 64 and f.url for f in s.files.values())
        assert s.pitch_um == 200


def test_unknown_manifest_key(tmp_path):
    p = write_manifest(tmp_path / "m.yaml", {"S1": "P1"}, extra="colour: blue\n")
    with pytest.raises(GnnstError, match=r"m.yaml: unknown manifest key '<top>.colour'"):
        load_manifest(p)


def test_unknown_reader(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nslides:\n  - slide_id: A\n    reader: nope\n    files: {counts: a.tsv}\n")
    with pytest.raises(GnnstError, match="reader' = 'nope' is unknown"):
        load_manifest(p)


def test_missing_file_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("GNNST_DATA_ROOT", raising=False)
    write_manifest(tmp_path / "m.yaml", {"S1": "P1"})
    m = load_manifest(tmp_path / "m.yaml")
    with pytest.raises(GnnstError, match=r"file 'S1.tsv.gz' .*not found \(looked in: .*root1/S1.tsv.gz, .*cache"):
        resolve_files(m, m.slides[0], data_root=str(tmp_path / "root1"), cache_dir=str(tmp_path / "cache"))


def test_download_from_source_with_checksum(tmp_path):
    """The download path, exercised with file:// URLs (tests never touch the network)."""
    src = tmp_path / "public"
    write_legacy_slide(src, "S1")
    sums = {n: hashlib.sha256((src / n).read_bytes()).hexdigest()
            for n in ("S1.tsv.gz", "S1_selection.tsv", "S1_HE.jpg")}
    text = "\n".join([
        "name: dl", "reader: legacy_st", f"source: {{base_url: 'file://{src}'}}", "slides:", "  - slide_id: S1",
        "    files:",
        *[f"      {r}: {{path: {n}, sha256: {sums[n]}, url: {n}}}"
          for r, n in (("counts", "S1.tsv.gz"), ("spots", "S1_selection.tsv"), ("image", "S1_HE.jpg"))],
    ])
    (tmp_path / "m.yaml").write_text(text + "\n")
    m = load_manifest(tmp_path / "m.yaml")
    cache = tmp_path / "cache"
    files = resolve_files(m, m.slides[0], data_root=str(tmp_path / "empty"), cache_dir=str(cache))
    assert files["counts"] == cache / "data" / "dl" / "S1.tsv.gz"
    assert files["counts"].read_bytes() == (src / "S1.tsv.gz").read_bytes()
    # a corrupted local copy is caught by its checksum
    shutil.copy(src / "S1_HE.jpg", tmp_path / "S1_HE.jpg")
    (tmp_path / "S1_HE.jpg").write_bytes(b"corrupt")
    with pytest.raises(GnnstError, match="S1_HE.jpg: checksum mismatch"):
        resolve_files(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(cache))
    # downloads switched off: the error says so and where to get the file
    with pytest.raises(GnnstError, match="downloads are off"):
        resolve_files(m, m.slides[0], data_root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c2"),
                      download=False)
