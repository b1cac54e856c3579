import numpy as np
import pytest

from gnnst.data.encoders import create_encoder, list_encoders
from gnnst.errors import GnnstError


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet_lite0")


def test_default_weights_are_real_imagenet_weights(lite0):
    """The classifier that came with the offline weights ranks skimage's chelsea as a cat."""
    import torch
    import torch.nn.functional as F
    from skimage.data import chelsea

    img = torch.from_numpy(np.asarray(chelsea())).permute(2, 0, 1)[None].float() / 255.0
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    feats = lite0.embed(img)
    assert feats.shape == (1, lite0.dim) == (1, 1280)
    with torch.inference_mode():
        top = lite0.classifier(feats).softmax(-1).topk(3)
    # ImageNet classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert 281 <= int(top.indices[0, 0]) <= 285
    assert float(top.values[0, 0]) > 0.5


def test_embed_is_batched_without_autograd(lite0):
    import torch

    x = torch.rand(3, 3, 96, 96, requires_grad=True)
    out = lite0.embed(x)
    assert out.shape == (3, 1280) and not out.requires_grad
    assert torch.isfinite(out).all()


def test_unknown_encoder_name():
    with pytest.raises(GnnstError, match="unknown encoder 'nope'.*efficientnet_lite0"):
        create_encoder("nope")
    assert "efficientnet_lite0" in list_encoders()


def test_timm_model_from_local_checkpoint(tmp_path):
    import timm
    import torch

    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    enc = create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "w.pth"))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = net.eval()((x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1))
    torch.testing.assert_close(enc.embed(x), ref)
    with pytest.raises(GnnstError, match="encoder checkpoint not found"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(GnnstError, match="lacks weights"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "bad.pth"))


def test_timm_hub_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network is touched
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(GnnstError, match="cannot get pretrained weights for timm model 'resnet10t'.*checkpoint"):
        create_encoder("timm:resnet10t")
    with pytest.raises(GnnstError, match="unknown timm model"):
        create_encoder("timm:not_a_model_xyz", checkpoint=None)
