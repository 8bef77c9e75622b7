"""The SDM U-Net: official state-dict layout, attention/embedding numerics, fast guided path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.nn import GroupNorm32, timestep_embedding
from guided_diffusion.script_util import create_model
from guided_diffusion.synthesis import FastGuidedDenoiser, PlainGuidedDenoiser
from guided_diffusion.unet import SDMResBlock, SPADEGroupNorm, SpadeCache, UNetModel, qkv_attention

MODEL_KEYS = [
    "image_size", "num_classes", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
    "class_cond", "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16",
    "use_new_attention_order", "no_instance",
]


def load_spec(spec_dir, name):
    return json.loads((spec_dir / f"sdm_state_dict_{name}.json").read_text())


def tiny_model(seed=0, **overrides) -> UNetModel:
    """The spec's tiny config (64 px, 32 channels) with random non-zero weights everywhere.

    The official init zeroes the residual output convs, which would make many comparisons
    trivially pass, so every parameter is redrawn.
    """
    cfg = dict(image_size=64, num_classes=5, num_channels=32, num_res_blocks=1, channel_mult="",
               learn_sigma=True, class_cond=True, attention_resolutions="16,8", num_heads=4,
               num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = create_model(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.eval()


def small_model(seed=0, **overrides) -> UNetModel:
    """A two-level 32 px model (attention at 16x16) for the tests that only need some SDM U-Net."""
    cfg = dict(image_size=32, channel_mult="1,2", attention_resolutions="16")
    cfg.update(overrides)
    return tiny_model(seed, **cfg)


def label_condition(n=2, size=64, num_classes=5, seed=1) -> torch.Tensor:
    """A hand-made condition: random rectangles of classes, one-hot + an edge channel."""
    g = torch.Generator().manual_seed(seed)
    types = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(4):
            x0, y0 = torch.randint(0, size - 12, (2,), generator=g).tolist()
            types[i, y0:y0 + 10, x0:x0 + 10] = int(torch.randint(1, num_classes, (1,), generator=g))
    onehot = torch.nn.functional.one_hot(types, num_classes).permute(0, 3, 1, 2).float()
    edge = torch.zeros(n, 1, size, size)
    edge[:, 0, :, 1:] += (types[:, :, 1:] != types[:, :, :-1]).float()
    return torch.cat([onehot, edge.clamp(max=1)], dim=1)


# ---- official layout ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "consep", "glysac"])
def test_state_dict_matches_official_layout(spec_dir, name):
    spec = load_spec(spec_dir, name)
    cfg = {k: spec["config"][k] for k in MODEL_KEYS}
    with torch.device("meta"):  # the 256 px models have 650M parameters: shapes only
        model = create_model(**cfg)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == spec["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == spec["total_params"]
    for section, count in spec["params_by_section"].items():
        assert sum(p.numel() for p in getattr(model, section).parameters()) == count, section
    assert not list(model.buffers())


def test_non_updown_layout_uses_conv_resamplers():
    model = create_model(image_size=32, num_classes=2, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                         class_cond=True, attention_resolutions="16", resblock_updown=False)
    sd = model.state_dict()
    assert sd["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)  # stride-2 conv down
    assert sd["output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)  # nearest x2 + conv up
    out = model(torch.randn(1, 3, 32, 32), torch.tensor([3]), y=torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32)


# ---- numerics of the pieces ---------------------------------------------------------------


def legacy_attention(qkv: torch.Tensor, n_heads: int, legacy_order: bool) -> torch.Tensor:
    """Straightforward einsum form of the official QKVAttentionLegacy / QKVAttention."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if legacy_order:
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("heads,ch", [(1, 32), (4, 16), (3, 8), (2, 64)])
def test_sdpa_attention_equals_legacy_einsum(legacy_order, heads, ch):
    torch.manual_seed(heads * 100 + ch)
    qkv = torch.randn(2, 3 * heads * ch, 50) * 2
    ref = legacy_attention(qkv, heads, legacy_order)
    got = qkv_attention(qkv, heads, legacy_order)
    assert got.shape == (2, heads * ch, 50)
    if ch >= 16:
        # On the CPU the math SDPA backend reproduces the official computation bit for bit (the
        # head widths of real configs are 16-128).
        assert torch.equal(got, ref)
    else:
        # With 8 channels per head BLAS sums the two memory layouts in different orders.
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_attention_orders_differ():
    # Guards the test above against a degenerate qkv where both orders coincide.
    qkv = torch.randn(1, 3 * 4 * 8, 10)
    assert not torch.allclose(qkv_attention(qkv, 4, True), qkv_attention(qkv, 4, False))


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 8)
    for i, tv in enumerate(t.tolist()):
        for j in range(4):
            f = math.exp(-math.log(10000) * j / 4)
            assert emb[i, j].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
            assert emb[i, 4 + j].item() == pytest.approx(math.sin(tv * f), abs=1e-5)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)
    torch.testing.assert_close(odd[:, :6], timestep_embedding(t, 6))


def test_spade_groupnorm_closed_form():
    torch.manual_seed(0)
    norm = SPADEGroupNorm(64, 3)
    with torch.no_grad():
        norm.mlp_gamma.weight.zero_()
        norm.mlp_gamma.bias.fill_(0.5)
        norm.mlp_beta.weight.zero_()
        norm.mlp_beta.bias.fill_(-2.0)
    x = torch.randn(2, 64, 8, 8) * 3 + 1
    out = norm(x, torch.rand(2, 3, 32, 32))
    groups = x.reshape(2, 32, -1)
    xn = ((groups - groups.mean(-1, keepdim=True)) / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True) + 1e-5))
    torch.testing.assert_close(out, xn.reshape_as(x) * 1.5 - 2.0, atol=1e-5, rtol=1e-5)


def test_spade_uses_nearest_resize_of_the_label_map():
    torch.manual_seed(0)
    norm = SPADEGroupNorm(32, 2)
    y = torch.rand(1, 2, 16, 16)
    scale, shift = norm.modulation(y, (4, 4))
    ref_scale, ref_shift = norm.modulation(y[:, :, ::4, ::4], (4, 4))  # nearest x1/4 picks every 4th pixel
    torch.testing.assert_close(scale, ref_scale)
    torch.testing.assert_close(shift, ref_shift)


def test_norm_precision():
    # Affine GroupNorm32: float32 statistics, result cast back to the input dtype.
    torch.manual_seed(0)
    gn = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 4, 4) * 5 + 3).bfloat16()
    out = gn(x)
    ref = torch.nn.functional.group_norm(x.float(), 32, gn.weight, gn.bias).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    # SPADE norm: group statistics in the input dtype, also under autocast.
    spade = SPADEGroupNorm(64, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scale, shift = spade.modulation(torch.rand(2, 3, 8, 8), (4, 4))
        y = spade.normalize(x, scale, shift)
    ref = torch.nn.functional.group_norm(x, 32) * scale + shift
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


# ---- whole model --------------------------------------------------------------------------


def test_forward_shape_backward_and_extra_kwargs():
    model = tiny_model().train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x, torch.tensor([3, 700]), y=label_condition(), s=1.5, gt=None)
    assert out.shape == (2, 6, 64, 64) and out.dtype == torch.float32
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.middle_block[0].in_norm.mlp_shared[0].weight.grad.abs().sum() > 0  # y reaches SPADE


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = small_model().train()
    ckpt = small_model(use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), label_condition(size=32)
    for model in (plain, ckpt):
        model(x, t, y=y).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_condition_errors():
    model = small_model()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(DiffMixError, match="needs the condition"):
        model(x, torch.tensor([1]))
    with pytest.raises(DiffMixError, match=r"expected \[N, 6, 32, 32\]"):
        model(x, torch.tensor([1]), y=torch.zeros(1, 5, 32, 32))
    with pytest.raises(DiffMixError, match="not divisible by 2"):
        model(torch.randn(1, 3, 31, 31), torch.tensor([1]), y=torch.zeros(1, 6, 31, 31))


# ---- fast guided path ---------------------------------------------------------------------


def official_guided(model, x, t, y, s):
    """Two full forwards combined as the official sampler does."""
    cond = model(x, t, y=y)
    if not s > 1:
        return cond
    uncond = model(x, t, y=torch.zeros_like(y))
    return torch.cat([uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)


def test_fast_guided_path_equals_two_full_forwards():
    model = tiny_model()
    x, t, y = torch.randn(2, 3, 64, 64), torch.tensor([40, 640]), label_condition()
    with torch.no_grad():
        ref = official_guided(model, x, t, y, 1.5)
        fast = FastGuidedDenoiser(model, y, 1.5)  # null cache at batch 1, broadcast
        one_by_one = fast(x, t)
        batched = FastGuidedDenoiser(model, y, 1.5, batched=True)(x, t)
        cond_only, none = model.forward_branches(x, t, fast.cache_cond)
    assert ref.abs().max() > 0.1  # non-trivial outputs
    assert (one_by_one - ref).abs().max() < 1e-4
    assert (batched - ref).abs().max() < 1e-4
    assert none is None and (cond_only - model(x, t, y=y)).abs().max() < 1e-4
    assert fast.cache_uncond.batch_size == 1
    assert len(fast.cache_cond) == 2 + 8 + 3  # middle, decoder, up blocks


def test_encode_decode_equals_forward_and_hs_is_reusable():
    model = small_model(use_scale_shift_norm=False, seed=3)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), label_condition(size=32, seed=4)
    with torch.no_grad():
        h, hs, emb = model.encode(x, t)
        n_skips = len(hs)
        a = model.decode(h, hs, emb, model.spade_cache(y))
        b = model.decode(h, hs, emb, y)
        ref = model(x, t, y=y)
    assert len(hs) == n_skips
    assert (a - ref).abs().max() < 1e-4 and (b - ref).abs().max() < 1e-6


def test_scale_one_runs_only_the_conditional_branch(monkeypatch):
    model = small_model()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([7, 70]), label_condition(size=32)
    calls = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    with torch.no_grad():
        fast = FastGuidedDenoiser(model, y, 1.0)
        out = fast(x, t)
        ref = model(x, t, y=y)
    assert fast.cache_uncond is None
    assert len(calls) == 2  # one in the fast denoiser, one in the reference forward
    assert (out - ref).abs().max() < 1e-4


def test_plain_guided_denoiser_is_the_official_combination():
    model = small_model(use_new_attention_order=True)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([11, 311]), label_condition(size=32)
    with torch.no_grad():
        ref = official_guided(model, x, t, y, 2.0)
        out = PlainGuidedDenoiser(model, y, 2.0)(x, t)
        fast = FastGuidedDenoiser(model, y, 2.0)(x, t)
    assert ref.abs().max() > 0.1
    assert torch.equal(out, ref)  # the same two forwards and the same formula: bit-identical
    assert (fast - ref).abs().max() < 1e-4


def test_spade_cache_expand_and_cat():
    model = small_model()
    with torch.no_grad():
        one = model.spade_cache(torch.zeros(1, 6, 32, 32))
    both = SpadeCache.cat([one.expand(3), one])
    assert both.batch_size == 4
    # Cache order: the middle block's two SPADE blocks first, then the decoder's, none from the encoder.
    blocks = model.spade_blocks()
    assert blocks[:2] == [model.middle_block[0], model.middle_block[2]]
    assert not any(isinstance(m, SDMResBlock) for m in model.input_blocks.modules())
    assert [b.cache_index for b in blocks] == list(range(len(blocks)))
    with pytest.raises(ValueError):
        both.expand(2)


def test_spade_hidden_width_is_a_model_setting():
    """A narrower SPADE label branch changes only the SPADE convs; the fast path stays exact."""
    base = small_model()
    narrow = small_model(spade_hidden=16)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    narrow_shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    assert shapes.keys() == narrow_shapes.keys()
    changed = {k for k in shapes if shapes[k] != narrow_shapes[k]}
    assert changed and all(".mlp_" in k for k in changed)
    assert narrow.output_blocks[0][0].in_norm.mlp_shared[0].weight.shape == (16, 6, 3, 3)
    assert base.output_blocks[0][0].in_norm.mlp_shared[0].weight.shape == (128, 6, 3, 3)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([40, 640]), label_condition(size=32)
    with torch.no_grad():
        ref = official_guided(narrow, x, t, y, 1.5)
        fast = FastGuidedDenoiser(narrow, y, 1.5)(x, t)
    assert ref.abs().max() > 0.1 and (fast - ref).abs().max() < 1e-4
