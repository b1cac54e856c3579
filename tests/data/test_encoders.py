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
    with pytest.raises(GnnstError, match="encoder 'timm:resnet10t': checkpoint not found"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(GnnstError, match=r"lacks tensor 'conv1.0.weight' \(24, 3, 3, 3\)"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "bad.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(GnnstError, match=r"junk.pth is not a weights file"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "junk.pth"))


def test_timm_checkpoint_is_strict_about_extra_tensors_and_unwraps_only_whole_prefixes(tmp_path):
    import timm
    import torch

    state = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    torch.save({**state, "fc.weight": torch.zeros(10, 512)}, tmp_path / "extra.pth")  # a head the model lacks
    with pytest.raises(GnnstError, match=r"has unexpected tensor 'fc.weight' \(0 missing, 1 unexpected"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "extra.pth"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    enc = create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "ddp.pth"))  # a DDP training checkpoint
    assert enc.dim == 512
    half = {(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(state.items())}
    torch.save(half, tmp_path / "half.pth")
    with pytest.raises(GnnstError, match="lacks tensor"):
        create_encoder("timm:resnet10t", checkpoint=str(tmp_path / "half.pth"))


def test_timm_kwargs_build_the_architecture_the_file_was_saved_from(tmp_path):
    """A ViT with LayerScale: without ``init_values`` timm builds no ``ls1.gamma`` and the file's
    tensors would have been dropped; with the argument the weights load and are used."""
    import timm
    import torch

    kw = {"img_size": 32, "patch_size": 16, "depth": 1, "init_values": 1e-5, "mlp_layer": "timm.layers.SwiGLUPacked",
          "act_layer": "torch.nn.SiLU", "mlp_ratio": 2.66667 * 2, "reg_tokens": 2, "no_embed_class": True}
    from gnnst.data.encoders.recipes import resolve_kwargs

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **resolve_kwargs(kw, where="t"))
    torch.save(net.state_dict(), tmp_path / "vit.bin")
    no_ls = {k: v for k, v in kw.items() if k != "init_values"}
    with pytest.raises(GnnstError, match=r"encoder 'timm:vit_tiny_patch16_224': .*vit.bin has unexpected tensor "
                                         r"'blocks.0.ls1.gamma' \(0 missing, 2 unexpected"):
        create_encoder("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.bin"), timm_kwargs=no_ls)
    enc = create_encoder("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.bin"), timm_kwargs=kw)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref = net.eval()((x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1))
    torch.testing.assert_close(enc.embed(x), ref)
    assert enc.record()["timm_kwargs"] == kw and "init_values" in enc.identity
    with pytest.raises(GnnstError, match=r"'mlp_layer: timm.layers.NoSuchLayer' names no class"):
        create_encoder("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.bin"),
                       timm_kwargs={"mlp_layer": "timm.layers.NoSuchLayer"})
    with pytest.raises(GnnstError, match=r"encoder.timm_kwargs': timm model 'vit_tiny_patch16_224' rejects them"):
        create_encoder("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.bin"), timm_kwargs={"bogus": 1})


def test_timm_hub_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network is touched
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(GnnstError, match="cannot get pretrained weights for timm model 'resnet10t'.*checkpoint"):
        create_encoder("timm:resnet10t")
    with pytest.raises(GnnstError, match="unknown timm model"):
        create_encoder("timm:not_a_model_xyz", checkpoint=None)


def test_fold_batchnorm_keeps_the_embeddings():
    """Folding batch norms into the convolutions changes nothing beyond float rounding and is checked."""
    import timm
    import torch

    from gnnst.data.encoders import fold_batchnorm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    for m in net.modules():  # non-trivial running statistics, so the fold has something to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    folded, n = fold_batchnorm(net, input_size=64)
    assert n == n_bn == 49
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn  # the input is left alone
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_refuses_what_it_cannot_fold():
    import torch
    from torch import nn

    from gnnst.data.encoders import fold_batchnorm

    class BnOnInput(nn.Module):  # conv and bn are siblings, but the bn is not applied to the conv's output
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.bn.running_mean.fill_(0.7)

        def forward(self, x):
            return self.conv(self.bn(x))

    with pytest.raises(GnnstError, match="differs from the original"):
        fold_batchnorm(BnOnInput().eval(), input_size=16)
    with pytest.raises(GnnstError, match="eval mode"):
        fold_batchnorm(BnOnInput().train(), input_size=16)
