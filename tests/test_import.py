import subprocess
import sys


def test_import_gnnst_is_light():
    code = ("import sys, gnnst, gnnst.keys, gnnst.config, gnnst.cli; "
            "heavy = [m for m in ('torch', 'timm', 'scanpy', 'squidpy', 'openslide', 'anndata', 'torch_geometric') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import gnnst pulled in: {out}"
