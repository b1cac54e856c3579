"""Foundation-model recipes without their (gated, multi-GB) weights.

For every recipe: the full network is built on the ``meta`` device and the tensor layout of the
authors' file it expects is compared with ``fixtures/encoder_layouts.json`` (count, parameters, a
digest of every name and shape, and the names and shapes outside blocks 1..N-1 spelled out); a file
written in that layout at a shrunken depth loads strictly and embeds to the recipe's width; a file
with one tensor too many, too few or of another shape is a one-line error naming it.

Regenerate the fixture (after checking a change against the authors' model cards) with
``python tests/data/test_encoder_recipes.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest

from gnnst.data.encoders import RECIPES, create_encoder, recipe_encoder
from gnnst.data.encoders.recipes import build_network, file_layout
from gnnst.errors import GnnstError

FIXTURE = Path(__file__).parent / "fixtures" / "encoder_layouts.json"
DEPTH = 2  # blocks of the small networks the exactness tests write and read
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|encoder\.layer)\.(\d+)\.")


def layout_summary(layout: dict) -> dict:
    """Compact, exact description of a name -> shape layout."""
    text = "\n".join(f"{k}:{','.join(map(str, layout[k]))}" for k in sorted(layout))
    sample = {}
    for k, shape in layout.items():
        m = _BLOCK.search(k)
        if m is None or m[1] == "0":
            sample[k] = list(shape)
    return {"tensors": len(layout), "parameters": sum(math.prod(s) for s in layout.values()),
            "sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "sample": sample}


def random_file_state(layout: dict, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(shape, generator=g) - 0.5) * 0.04 for k, shape in layout.items()}


def meta_state(layout: dict) -> dict:
    import torch

    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


@pytest.fixture(scope="module")
def published() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_full_network_expects_the_authors_file_layout(name, published):
    recipe = RECIPES[name]
    net = build_network(recipe)  # full size, no memory
    got = layout_summary(file_layout(recipe, net))
    want = published[name]
    diff = [k for k in sorted(set(want["sample"]) | set(got["sample"])) if want["sample"].get(k) != got["sample"].get(k)]
    assert not diff, f"{name}: first differing tensor {diff[0]}: published {want['sample'].get(diff[0])}, built " \
                     f"{got['sample'].get(diff[0])}"
    assert got == want
    probe = net.trunk if hasattr(net, "trunk") else net
    assert probe.pos_embed.is_meta  # nothing was allocated


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_tensor_is_checked(name):
    """An extra, a missing and a misshapen tensor in the authors' full layout each name the tensor."""
    recipe = RECIPES[name]
    from gnnst.data.encoders.loading import check_layout

    layout = file_layout(recipe, build_network(recipe))
    check_layout(meta_state(layout), layout, label=name, path="w.bin")  # the exact layout passes
    extra = {**meta_state(layout), "head.weight": meta_state({"x": (1000, 8)})["x"]}
    with pytest.raises(GnnstError, match=rf"encoder '{re.escape(name)}': w.bin has unexpected tensor 'head.weight' "
                                         r"\(0 missing, 1 unexpected"):
        check_layout(extra, layout, label=name, path="w.bin")
    victim = [k for k in layout if _BLOCK.search(k)][-1]
    missing = {k: v for k, v in meta_state(layout).items() if k != victim}
    with pytest.raises(GnnstError, match=rf"lacks tensor '{re.escape(victim)}'"):
        check_layout(missing, layout, label=name, path="w.bin")
    first = next(iter(layout))
    bent = {**meta_state(layout), first: meta_state({"x": (*layout[first][:-1], layout[first][-1] + 1)})["x"]}
    with pytest.raises(GnnstError, match=rf"tensor '{re.escape(first)}' has shape .*the model needs"):
        check_layout(bent, layout, label=name, path="w.bin")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_small_file_in_the_authors_layout_loads_and_embeds(name, tmp_path):
    import torch

    recipe = RECIPES[name]
    small = {"depth": 1}
    layout = file_layout(recipe, build_network(recipe, overrides=small))
    state = random_file_state(layout)
    if recipe.files.startswith("model.safetensors"):
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    enc = recipe_encoder(name, str(path), overrides=small)
    assert (enc.input_size, enc.dim, enc.mean, enc.std) == (recipe.input_size, recipe.dim, recipe.mean, recipe.std)
    assert enc.patch_um == pytest.approx(recipe.input_size * recipe.mpp)
    assert not any(p.requires_grad or p.is_meta for p in enc.model.parameters())
    x = torch.rand(2, 3, recipe.input_size, recipe.input_size, generator=torch.Generator().manual_seed(1))
    out = enc.embed(x)
    assert out.shape == (2, recipe.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # the image matters
    if recipe.layout == "timm":  # loaded as they are
        for k, v in enc.model.trunk.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_recipe_file_with_an_extra_tensor_fails_end_to_end(tmp_path):
    import torch

    recipe = RECIPES["uni"]
    layout = file_layout(recipe, build_network(recipe, overrides={"depth": 1}))
    state = random_file_state(layout)
    torch.save({**state, "head.weight": torch.zeros(1000, 1024)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(GnnstError) as e:
        recipe_encoder("uni", str(tmp_path / "pytorch_model.bin"), overrides={"depth": 1})
    msg = str(e.value)
    assert "\n" not in msg and "encoder 'uni'" in msg and "pytorch_model.bin" in msg and "'head.weight'" in msg
    del state["blocks.0.ls1.gamma"]  # what timm without init_values would silently leave at random
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(GnnstError, match=r"lacks tensor 'blocks.0.ls1.gamma' \(1024,\) \(1 missing"):
        recipe_encoder("uni", str(tmp_path / "pytorch_model.bin"), overrides={"depth": 1})


def test_recipe_needs_its_file_and_fixes_its_architecture():
    with pytest.raises(GnnstError, match=r"encoder 'uni' needs its weights file.*huggingface.co/MahmoodLab/UNI"):
        create_encoder("uni")
    with pytest.raises(GnnstError, match=r"encoder.timm_kwargs' applies to timm:<model>"):
        create_encoder("uni", checkpoint="x.bin", timm_kwargs={"depth": 2})
    with pytest.raises(GnnstError, match=r"checkpoint not found"):
        create_encoder("virchow2", checkpoint="/nonexistent/pytorch_model.bin")


def _hf_dinov2_forward(state: dict, x, *, heads: int, eps: float = 1e-6):
    """Phikon-v2 as transformers' Dinov2Model computes it, from its own tensor names (reference)."""
    import torch
    import torch.nn.functional as F

    d = state["embeddings.cls_token"].shape[-1]
    t = F.conv2d(x, state["embeddings.patch_embeddings.projection.weight"],
                 state["embeddings.patch_embeddings.projection.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([state["embeddings.cls_token"].expand(len(x), -1, -1), t], 1) + state["embeddings.position_embeddings"]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    for i in layers:
        p = lambda n: state[f"encoder.layer.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(t, (d,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = (F.linear(h, p(f"attention.attention.{n}.weight"), p(f"attention.attention.{n}.bias"))
                   .reshape(len(x), -1, heads, d // heads).transpose(1, 2) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(len(x), -1, d), p("attention.output.dense.weight"),
                     p("attention.output.dense.bias"))
        t = t + a * p("layer_scale1.lambda1")
        h = F.layer_norm(t, (d,), p("norm2.weight"), p("norm2.bias"), eps)
        h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + h * p("layer_scale2.lambda1")
    return F.layer_norm(t, (d,), state["layernorm.weight"], state["layernorm.bias"], eps)[:, 0]


def test_phikon_v2_renaming_computes_the_transformers_network(tmp_path):
    import torch
    from safetensors.torch import save_file

    recipe = RECIPES["phikon-v2"]
    layout = file_layout(recipe, build_network(recipe, overrides={"depth": DEPTH}))
    assert "embeddings.mask_token" in layout  # in the authors' file, unused at inference
    state = random_file_state(layout, seed=3)
    save_file(state, str(tmp_path / "model.safetensors"))
    enc = recipe_encoder("phikon-v2", str(tmp_path / "model.safetensors"), overrides={"depth": DEPTH})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), _hf_dinov2_forward(state, x, heads=16), rtol=1e-4, atol=1e-5)


def _conch_forward(state: dict, x, trunk):
    """CONCH v1.5 as the authors' code computes it: a ViT trained at 224 whose position embedding is
    interpolated at every forward (DINO style), then the einsum attentional pooler (reference)."""
    import torch
    import torch.nn.functional as F

    tr = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    trunk.load_state_dict(tr)
    t = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, 28 * 28, D]
    t = torch.cat([trunk.cls_token.expand(len(x), -1, -1), t], 1)
    pos, n, d = tr["pos_embed"], 14, t.shape[-1]
    w0 = x.shape[-1] // 16 + 0.1
    pp = F.interpolate(pos[:, 1:].reshape(1, n, n, d).permute(0, 3, 1, 2), scale_factor=(w0 / n, w0 / n), mode="bicubic")
    t = t + torch.cat([pos[:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)
    t = trunk.norm(trunk.blocks(t))
    p = lambda n: state[f"attn_pool_contrast.{n}"]  # noqa: E731
    kv = F.layer_norm(t, (d,), p("ln_k.weight"), p("ln_k.bias"))
    q = F.layer_norm(p("query"), (768,), p("ln_q.weight"), p("ln_q.bias")) @ p("to_q.weight").T  # [1, 768]
    k, v = (kv @ p("to_kv.weight").T).chunk(2, -1)  # [B, T, 768]
    h = 8
    q = q.reshape(1, h, 96).transpose(0, 1) * 96 ** -0.5  # [h, 1, 96]
    k, v = (z.reshape(len(x), -1, h, 96).permute(0, 2, 1, 3) for z in (k, v))  # [B, h, T, 96]
    sim = torch.einsum("hid,bhjd->bhij", q, k)
    out = torch.einsum("bhij,bhjd->bhid", (sim - sim.amax(-1, keepdim=True)).softmax(-1), v)
    out = out.permute(0, 2, 1, 3).reshape(len(x), 1, 768) @ p("to_out.weight").T
    return F.layer_norm(out[:, 0], (768,), state["ln_contrast.weight"], state["ln_contrast.bias"])


def test_conch_v15_matches_the_authors_forward(tmp_path):
    import timm
    import torch

    recipe = RECIPES["conch-v1.5"]
    layout = file_layout(recipe, build_network(recipe, overrides={"depth": DEPTH}))
    assert layout["trunk.pos_embed"] == (1, 197, 1024)  # as distributed: the 224-px grid
    state = random_file_state(layout, seed=5)
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    enc = recipe_encoder("conch-v1.5", str(tmp_path / "pytorch_model_vision.bin"), overrides={"depth": DEPTH})
    ref_trunk = timm.create_model("vit_large_patch16_224", img_size=224, init_values=1.0, num_classes=0, depth=DEPTH,
                                  ).eval()
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), _conch_forward(state, x, ref_trunk), rtol=1e-4, atol=1e-4)


def test_virchow2_concatenates_class_token_and_mean_of_patch_tokens(tmp_path):
    import torch

    recipe = RECIPES["virchow2"]
    layout = file_layout(recipe, build_network(recipe, overrides={"depth": 1}))
    torch.save(random_file_state(layout, seed=7), tmp_path / "pytorch_model.bin")
    enc = recipe_encoder("virchow2", str(tmp_path / "pytorch_model.bin"), overrides={"depth": 1})
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = enc.model.trunk.forward_features(x)  # [2, 1 + 4 + 256, 1280]
        assert tokens.shape == (2, 261, 1280)
        torch.testing.assert_close(enc.model(x), torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1))


def write_fixture() -> None:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    out = {n: layout_summary(file_layout(r, build_network(r))) for n, r in sorted(RECIPES.items())}
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    for n, s in out.items():
        print(f"{n}: {s['tensors']} tensors, {s['parameters'] / 1e6:.1f} M parameters")


if __name__ == "__main__":
    write_fixture()
