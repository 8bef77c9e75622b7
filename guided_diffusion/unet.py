"""The SDM U-Net used by DiffMix, with the official module layout and a fast guided-sampling path.

Architecture and ``state_dict`` keys/shapes/order equal the official SDM ``UNetModel``
(WeilunWang/semantic-diffusion-model, used unchanged by DiffMix), so official checkpoints load
with ``strict=True``:

* encoder (``input_blocks``): plain residual blocks (timestep FiLM, no label map) + attention;
* ``middle_block`` and decoder (``output_blocks``): SPADE residual blocks whose group norms are
  modulated by the label map ``y`` (float [N, cond_ch, H, W], resized by nearest interpolation).

Fast guided sampling exploits two facts: the encoder never sees ``y``, and every SPADE
gamma/beta depends only on ``y`` (not on ``x`` or ``t``). So for classifier-free guidance
(``model(x, t, y)`` and ``model(x, t, 0)``) :meth:`UNetModel.spade_cache` precomputes all SPADE
modulations once per condition, and :meth:`UNetModel.forward_branches` runs the encoder once and the
SPADE-free remainder of the decoder twice (the guidance formula itself is the sampler's). Both paths do the same arithmetic, so their outputs
agree to float rounding.

Precision: parameters stay float32. Where the official code converted the trunk to fp16
(``use_fp16``), callers here use ``torch.autocast``; the affine GroupNorms still compute in float32
and the SPADE GroupNorms in the input dtype, as officially.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .infra.errors import DiffMixError
from .nn import SiLU, autocast_disabled, checkpoint, normalization, timestep_embedding, zero_module

SPADE_HIDDEN = 128  # hidden width of the SPADE label branch in the official code (the default)


# --------------------------------------------------------------------------------------------
# SPADE modulation and its cache
# --------------------------------------------------------------------------------------------


class SpadeParams(NamedTuple):
    """Precomputed SPADE modulation of one SPADE residual block.

    ``scale`` is ``1 + gamma`` (stored that way so it is added once per patch, not per step);
    ``shift`` is beta. Each tensor is float [B, C, h, w] at that norm's feature size; B is
    the condition batch (1 broadcasts over any batch).
    """

    in_scale: torch.Tensor
    in_shift: torch.Tensor
    out_scale: torch.Tensor
    out_shift: torch.Tensor


class SpadeCache:
    """All SPADE modulations of a model for one condition batch (from :meth:`UNetModel.spade_cache`).

    ``params[i]`` belongs to the SPADE residual block with ``cache_index == i`` (middle block
    first, then the decoder in order). Memory: two tensors of the feature-map size per SPADE
    norm, i.e. several times a decoder's activations; build the null-condition cache at batch 1.
    """

    def __init__(self, params: Sequence[SpadeParams]):
        self.params = list(params)
        self._paired: Optional[tuple["SpadeCache", int, "SpadeCache"]] = None

    @property
    def batch_size(self) -> int:
        return int(self.params[0].in_scale.shape[0])

    def __len__(self) -> int:
        return len(self.params)

    def expand(self, n: int) -> "SpadeCache":
        """Broadcast a batch-1 cache to batch ``n`` (a view, no copy); a batch-``n`` cache is returned as is."""
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a SPADE cache of batch {self.batch_size} to batch {n}")
        return SpadeCache([SpadeParams(*(t.expand(n, *t.shape[1:]) for t in p)) for p in self.params])

    @staticmethod
    def cat(caches: Sequence["SpadeCache"]) -> "SpadeCache":
        """Concatenate caches along the batch dimension (same model, same spatial size)."""
        if len({len(c) for c in caches}) != 1:
            raise ValueError("SPADE caches come from different models")
        return SpadeCache(
            [SpadeParams(*(torch.cat(ts, dim=0) for ts in zip(*ps))) for ps in zip(*(c.params for c in caches))]
        )

    def paired_with(self, uncond: "SpadeCache", n: int) -> "SpadeCache":
        """``cat([self.expand(n), uncond.expand(n)])``, built once and kept with this cache.

        The batched guided step needs it every step; rebuilding it would copy the whole cache.
        """
        if self._paired is None or self._paired[0] is not uncond or self._paired[1] != n:
            self._paired = (uncond, n, SpadeCache.cat([self.expand(n), uncond.expand(n)]))
        return self._paired[2]

    def to(self, *args, **kwargs) -> "SpadeCache":
        """``Tensor.to`` applied to every tensor (device and/or dtype)."""
        return SpadeCache([SpadeParams(*(t.to(*args, **kwargs) for t in p)) for p in self.params])


Condition = Union[torch.Tensor, SpadeCache, None]


class SPADEGroupNorm(nn.Module):
    """Spatially-adaptive GroupNorm: ``GroupNorm(x) * (1 + gamma(y)) + beta(y)``.

    Split into :meth:`modulation` (depends on the label map only, so it can be cached) and
    :meth:`normalize` (applies it to features).

    The group norm has 32 groups and no affine parameters and runs in the input dtype (no upcast,
    as in the official code). gamma/beta come from the label map resized to the feature size by
    nearest interpolation: 3x3 conv (label_nc -> hidden) + ReLU, then two 3x3 convs (hidden -> C).
    ``hidden`` is 128 in the official model; small CPU models use less, because at 128 the label
    branch dominates a narrow U-Net's compute.
    """

    def __init__(self, norm_nc: int, label_nc: int, eps: float = 1e-5, hidden: int = SPADE_HIDDEN):
        super().__init__()
        self.norm = nn.GroupNorm(32, norm_nc, affine=False, eps=eps)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def modulation(self, segmap: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + gamma, beta), each float [N, C, *size], for a label map float [N, label_nc, H, W]."""
        segmap = F.interpolate(segmap, size=tuple(size), mode="nearest")
        actv = self.mlp_shared(segmap)
        return 1 + self.mlp_gamma(actv), self.mlp_beta(actv)

    def normalize(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``GroupNorm(x) * scale + shift`` for features x (float [N, C, h, w]); scale/shift batch N or 1."""
        with autocast_disabled(x.device.type):
            xn = self.norm(x)
        # Multiply then add, as officially: a fused addcmul rounds differently in the last bit.
        return xn * scale + shift

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, *self.modulation(segmap, x.shape[-2:]))


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class TimestepBlock(nn.Module):
    """Marker: ``forward(x, emb)`` takes the timestep embedding."""


class CondTimestepBlock(nn.Module):
    """Marker: ``forward(x, cond, emb)`` takes the condition (label map or SPADE cache) and embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """A sequential container that feeds each child the extra inputs it accepts."""

    def forward(self, x: torch.Tensor, cond: Condition, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, CondTimestepBlock):
                x = layer(x, cond, emb)
            elif isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 up-sampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 down-sampling: a stride-2 3x3 conv (key ``op``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool down-sampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def _resamplers(channels: int, up: bool, down: bool) -> tuple[nn.Module, nn.Module]:
    if up:
        return Upsample(channels, False), Upsample(channels, False)
    if down:
        return Downsample(channels, False), Downsample(channels, False)
    return nn.Identity(), nn.Identity()


def _skip(channels: int, out_channels: int, use_conv: bool) -> nn.Module:
    if out_channels == channels:
        return nn.Identity()
    if use_conv:
        return nn.Conv2d(channels, out_channels, 3, padding=1)
    return nn.Conv2d(channels, out_channels, 1)


class ResBlock(TimestepBlock):
    """Plain residual block of the encoder (no label map).

    ``in_layers`` = [GroupNorm32, SiLU, conv3x3]; ``emb_layers`` = [SiLU, Linear(emb, 2C or C)];
    ``out_layers`` = [GroupNorm32, SiLU, Dropout, zero conv3x3]. With ``up``/``down`` both the
    residual and the skip branch are resampled before the first conv.

    x: float [N, channels, h, w]; emb: float [N, emb_channels] -> float [N, out_channels, h', w'].
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd, self.x_upd = _resamplers(channels, up, down)
        self.emb_layers = nn.Sequential(
            SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = _skip(channels, self.out_channels, use_conv)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class SDMResBlock(CondTimestepBlock):
    """SPADE residual block of the middle block and decoder.

    ``in_norm`` (SPADE) -> ``in_layers`` = [SiLU, conv3x3] (resampling between SiLU and conv when
    up/down); then with ``use_scale_shift_norm``: ``out_norm(h, y) * (1 + scale) + shift``, else
    ``out_norm(h + emb, y)``; then ``out_layers`` = [SiLU, Dropout, zero conv3x3]; plus the skip.

    ``cond`` is either the label map (float [N, label_nc, H, W]) or a :class:`SpadeCache`, from
    which this block takes ``params[self.cache_index]``. ``in_ds`` is the down-sampling factor of
    the block's input relative to the image (set by :class:`UNetModel`; used to size the cache).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        c_channels: int = 3,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        spade_hidden: int = SPADE_HIDDEN,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.cache_index = -1
        self.in_ds = 1
        self.in_norm = SPADEGroupNorm(channels, c_channels, hidden=spade_hidden)
        self.in_layers = nn.Sequential(SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        self.h_upd, self.x_upd = _resamplers(channels, up, down)
        self.emb_layers = nn.Sequential(
            SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_norm = SPADEGroupNorm(self.out_channels, c_channels, hidden=spade_hidden)
        self.out_layers = nn.Sequential(
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = _skip(channels, self.out_channels, use_conv)

    def feature_sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(h, w) seen by ``in_norm`` and by ``out_norm`` for an image of ``height`` x ``width``."""
        size_in = (height // self.in_ds, width // self.in_ds)
        if self.up:
            return size_in, (size_in[0] * 2, size_in[1] * 2)
        if self.down:
            return size_in, (size_in[0] // 2, size_in[1] // 2)
        return size_in, size_in

    def spade_params(self, y: torch.Tensor) -> SpadeParams:
        """This block's modulation for label map ``y`` (float [N, label_nc, H, W])."""
        size_in, size_out = self.feature_sizes(y.shape[-2], y.shape[-1])
        return SpadeParams(*self.in_norm.modulation(y, size_in), *self.out_norm.modulation(y, size_out))

    def forward(self, x: torch.Tensor, cond: Condition, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(cond, SpadeCache):
            return checkpoint(self._forward, x, emb, None, cond.params[self.cache_index], enabled=self.use_checkpoint)
        if cond is None:
            raise ValueError("the SPADE blocks need a label map y or a SpadeCache")
        return checkpoint(self._forward, x, emb, cond, None, enabled=self.use_checkpoint)

    def _forward(
        self, x: torch.Tensor, emb: torch.Tensor, y: Optional[torch.Tensor], params: Optional[SpadeParams]
    ) -> torch.Tensor:
        in_mod = params[:2] if params is not None else self.in_norm.modulation(y, x.shape[-2:])
        h = self.in_norm.normalize(x, *in_mod)
        if self.updown:
            h = self.in_layers[:-1](h)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(h)
        out_mod = params[2:] if params is not None else self.out_norm.modulation(y, h.shape[-2:])
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm.normalize(h, *out_mod) * (1 + scale) + shift
        else:
            h = self.out_norm.normalize(h + emb_out, *out_mod)
        return self.skip_connection(x) + self.out_layers(h)


def qkv_attention(qkv: torch.Tensor, n_heads: int, legacy_order: bool = True) -> torch.Tensor:
    """Multi-head self-attention of a packed qkv tensor via ``scaled_dot_product_attention``.

    Legacy order (official default): qkv is viewed as [N * heads, 3 * ch, T] and split into q, k,
    v per head. New order: qkv is split into q, k, v first, each then viewed as [N * heads, ch, T].
    The official code scales q and k by ch^-1/4 each and takes the softmax in float32; SDPA's
    single 1/sqrt(ch) scale is the same product.

    Args:
        qkv: float [N, 3 * heads * ch, T].
    Returns:
        float [N, heads * ch, T].
    """
    bs, width, length = qkv.shape
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {n_heads} heads")
    ch = width // (3 * n_heads)
    if legacy_order:
        q, k, v = qkv.reshape(bs, n_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (t.reshape(bs, n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    # SDPA wants [..., T, ch] with a contiguous last dim for its fused kernels.
    q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
    if q.device.type == "cpu":
        # The math backend scales q and k by ch^-1/4 each and takes a float32 softmax: exactly the
        # official legacy computation, bit for bit. Accelerators use the fused kernels.
        # Passing the square of the official ch^-1/4 makes the backend's sqrt(scale) that exact double.
        with sdpa_kernel(SDPBackend.MATH):
            a = F.scaled_dot_product_attention(q, k, v, scale=(1 / math.sqrt(math.sqrt(ch))) ** 2)
    else:
        a = F.scaled_dot_product_attention(q, k, v)
    return a.transpose(-1, -2).reshape(bs, n_heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: norm -> qkv (1x1 conv1d) -> attention -> zero proj_out.

    x: float [N, C, h, w] -> same shape. Heads: ``channels // num_head_channels`` when
    ``num_head_channels`` > 0, else ``num_heads``. The official code always checkpoints this block;
    here it follows ``use_checkpoint`` (values are the same either way).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def downsampling_factor(channel_mult: Sequence[float]) -> int:
    """The U-Net's total down-sampling: image sides must be multiples of it (one halving per level after the first)."""
    return 2 ** (len(channel_mult) - 1)


# --------------------------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """The SDM U-Net (official constructor arguments and module names).

    Args:
        image_size: nominal training size (recorded; any size divisible by
            ``2 ** (len(channel_mult) - 1)`` runs).
        in_channels / out_channels: image channels in (3) and out (6 with learned sigma, else 3).
        model_channels: base width; level widths are ``int(mult * model_channels)``.
        num_res_blocks: residual blocks per encoder level (decoder: one more).
        attention_resolutions: down-sampling factors (e.g. (8, 16, 32)) that get attention.
        channel_mult: width multipliers per level.
        num_classes: width of the condition ``y`` (classes + 1 instance-edge channel unless
            ``no_instance``; the official name is kept). Required.
        use_fp16: recorded only; use ``torch.autocast`` for mixed precision (parameters stay fp32).
        spade_hidden: hidden width of every SPADE label branch (official: 128).
        Other arguments as in openai/guided-diffusion.

    Call: ``model(x, t, y=cond)`` with x float [N, in_channels, H, W] (in [-1, 1]), t [N]
    timesteps, cond float [N, num_classes, H, W] -> float [N, out_channels, H, W] in x's dtype.
    Extra keyword arguments (``s``, ``gt``, ...) are accepted and ignored.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        spade_hidden: int = SPADE_HIDDEN,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError("only 2-D images are supported (dims=2)")
        if num_classes is None:
            raise DiffMixError(
                "the SDM U-Net is conditioned on a label map: set class_cond True (num_classes gives its width)"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        def res_block(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def sdm_block(ch_in: int, ch_out: int, in_ds: int, **kw) -> SDMResBlock:
            block = SDMResBlock(ch_in, time_embed_dim, dropout, c_channels=num_classes, out_channels=ch_out,
                                use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                                spade_hidden=spade_hidden, **kw)
            block.in_ds = in_ds
            return block

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            sdm_block(ch, ch, ds), attention(ch, num_heads), sdm_block(ch, ch, ds)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [sdm_block(ch + ich, int(model_channels * mult), ds)]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(sdm_block(ch, ch, ds, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        for index, block in enumerate(self.spade_blocks()):
            block.cache_index = index
        self.num_spade_blocks = index + 1

    # ---- helpers --------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (float32 unless the caller converted the model)."""
        return next(self.parameters()).dtype

    def spade_blocks(self) -> list[SDMResBlock]:
        """The SPADE residual blocks in cache order (middle block, then decoder)."""
        return [m for m in self.modules() if isinstance(m, SDMResBlock)]

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`DiffMixError` unless a ``height`` x ``width`` input fits: both multiples of
        the U-Net's total down-sampling (any such size works; ``image_size`` is not required)."""
        factor = downsampling_factor(self.channel_mult)
        if height % factor or width % factor:
            raise DiffMixError(
                f"image size {height}x{width} is not divisible by {factor}, which this U-Net "
                f"({len(self.channel_mult)} levels) needs"
            )

    def _check_condition(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.dim() != 4 or y.shape[1] != self.num_classes or y.shape[-2:] != x.shape[-2:]:
            raise DiffMixError(
                f"condition y has shape {tuple(y.shape)}, expected [N, {self.num_classes}, "
                f"{x.shape[-2]}, {x.shape[-1]}] (num_classes + 1 instance-edge channel unless no_instance)"
            )
        if y.shape[0] not in (1, x.shape[0]):
            raise DiffMixError(f"condition batch {y.shape[0]} does not match image batch {x.shape[0]}")

    # ---- plain path ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None, **kwargs):
        """Noise (and variance) prediction; see the class docstring for shapes."""
        if y is None:
            raise DiffMixError("the SDM U-Net needs the condition y (label map); got y=None")
        self._check_condition(x, y)
        h, hs, emb = self.encode(x, timesteps)
        return self.decode(h, hs, emb, y.to(h.dtype)).to(x.dtype)

    # ---- split path for fast guided sampling ----------------------------------------------

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor):
        """Time embedding and encoder (label-map free).

        Args:
            x: float [N, in_channels, H, W]; timesteps: [N] (or a scalar, broadcast to N).
        Returns:
            (h, hs, emb): the deepest features, the list of every encoder block's output (skips,
            in order) and the time embedding float [N, 4 * model_channels].
        """
        self.check_size(x.shape[-2], x.shape[-1])
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        h = x.to(self.dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, None, emb)
            hs.append(h)
        return h, hs, emb

    def decode(self, h: torch.Tensor, hs: Sequence[torch.Tensor], emb: torch.Tensor, cond: Condition):
        """Middle block, decoder and output head.

        Args:
            h, hs, emb: from :meth:`encode` (``hs`` is not modified, so it can be decoded twice).
            cond: label map float [N or 1, num_classes, H, W] or a :class:`SpadeCache` for the
                same image size (batch N or 1).
        Returns:
            float [N, out_channels, H, W].
        """
        if isinstance(cond, SpadeCache):
            first = cond.params[0].in_scale
            if len(cond) != self.num_spade_blocks or first.shape[-2:] != h.shape[-2:]:
                raise ValueError("SPADE cache was built for another model or image size")
            if cond.batch_size not in (1, h.shape[0]):
                raise ValueError(f"SPADE cache batch {cond.batch_size} does not match feature batch {h.shape[0]}")
        h = self.middle_block(h, cond, emb)
        for module, skip in zip(self.output_blocks, reversed(hs)):
            h = module(torch.cat([h, skip], dim=1), cond, emb)
        return self.out(h)

    def spade_cache(self, y: torch.Tensor, dtype: Optional[torch.dtype] = None) -> SpadeCache:
        """Precompute every SPADE gamma/beta for condition ``y`` (float [N, num_classes, H, W]).

        The result depends only on ``y`` and the weights, so it stays valid for every timestep of
        a sampling run. For the all-zero null condition pass ``torch.zeros(1, C, H, W)``: a
        batch-1 cache broadcasts over any batch. ``dtype`` optionally stores the cache in a
        smaller type (e.g. float16 halves its memory, at fp16 rounding of gamma/beta).
        """
        self.check_size(y.shape[-2], y.shape[-1])
        if y.dim() != 4 or y.shape[1] != self.num_classes:
            raise DiffMixError(f"condition y has shape {tuple(y.shape)}, expected [N, {self.num_classes}, H, W]")
        y = y.to(self.dtype)
        params = [block.spade_params(y) for block in self.spade_blocks()]
        cache = SpadeCache(params)
        return cache.to(dtype) if dtype is not None else cache

    def forward_branches(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        cache_cond: SpadeCache,
        cache_uncond: Optional[SpadeCache] = None,
        batched: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The conditional and (with ``cache_uncond``) unconditional outputs, the encoder run once.

        Each equals ``model(x, t, y)`` for the condition its cache was built from. The middle block
        and decoder run per branch, either one after the other or (``batched=True``) in one call
        on a doubled batch, which can use a GPU better but keeps a doubled copy of the caches
        (built on the first call, held by ``cache_cond``). How the two are combined is a sampling
        rule (:func:`guided_diffusion.samplers.cfg_combine`), not the network's.

        Args:
            x: float [N, in_channels, H, W]; timesteps: [N].
            cache_cond: cache of the condition (batch N or 1); cache_uncond: cache of the
                null condition (batch 1 or N), or None to run the conditional branch only.
        Returns:
            ``(cond_out, uncond_out or None)``, each float [N, out_channels, H, W] in x's dtype.
        """
        h, hs, emb = self.encode(x, timesteps)
        if cache_uncond is None:
            return self.decode(h, hs, emb, cache_cond).to(x.dtype), None
        n = x.shape[0]
        if batched:
            both = cache_cond.paired_with(cache_uncond, n)
            out = self.decode(torch.cat([h, h]), [torch.cat([t, t]) for t in hs], torch.cat([emb, emb]), both)
            cond_out, uncond_out = out[:n], out[n:]
        else:
            cond_out = self.decode(h, hs, emb, cache_cond)
            uncond_out = self.decode(h, hs, emb, cache_uncond)
        return cond_out.to(x.dtype), uncond_out.to(x.dtype)
