"""TargetFolder: a fold's targets held in unlinked, memory-mapped files, values unchanged."""

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hold_keeps_values_and_dtype_and_leaves_no_file(tmp_path, dtype):
    from gnnst.graph.targets import TargetFolder

    y = np.random.default_rng(0).normal(size=(37, 5)).astype(dtype)
    with TargetFolder(tmp_path) as tf:
        t = tf.hold(y)
        assert t.shape == (37, 5) and t.numpy().dtype == dtype and np.array_equal(t.numpy(), y)
        assert list(tf.path.iterdir()) == []  # unlinked once mapped
        assert tf.bytes == y.nbytes
        t2 = t.clone()
        tf.release(t)  # pages dropped from the process, read back from the file when touched
        assert torch.equal(t, t2)
        t[0, 0] = 7.0  # writable, privately
        assert float(t[0, 0]) == 7.0
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(t[1:], t2[1:])  # valid after the folder is gone


def test_empty_and_unwritable_folder(tmp_path):
    from gnnst.errors import GnnstError
    from gnnst.graph.targets import TargetFolder

    with TargetFolder(tmp_path) as tf:
        assert tf.hold(np.zeros((0, 4), np.float32)).shape == (0, 4)
    with pytest.raises(GnnstError, match="missing.*TMPDIR"):
        TargetFolder(tmp_path / "missing")
