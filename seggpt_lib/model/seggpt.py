"""SegGPT: the official ``seggpt_vit_large_patch16_input896x448`` network, readable top to bottom.

Inputs are two images stacked vertically (prompt on top, query below) and their two label
images stacked the same way. Image and label tokens share one patch embedding; hidden label
patches become ``mask_token``. The two streams run as one batch through blocks
``0..merge_index`` and are then averaged into one. Features after ``out_indices`` blocks are
normalised, concatenated and decoded to a 3-channel image (the painted label pair).

``state_dict()`` names and shapes are the official ones, so the official checkpoint loads
with ``strict=True`` (see :mod:`seggpt_lib.model.checkpoint` for HF and other formats).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seggpt_lib.model.attention import rel_pos_attention
from seggpt_lib.utils.masking import query_half_mask


@dataclass
class SegGPTConfig:
    """Architecture hyper-parameters; field names follow the official constructor."""

    img_size: tuple[int, int] = (896, 448)  # the stacked pair: (2H, W)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    decoder_embed_dim: int = 64
    pretrain_img_size: int = 224  # grid of the stored absolute position embedding
    out_indices: tuple[int, ...] = (5, 11, 17, 23)
    merge_index: int = 2
    layer_norm_eps: float = 1e-6
    loss_beta: float = 0.01  # smooth-L1 beta
    attn_impl: str = "auto"  # see seggpt_lib.model.attention
    use_act_checkpoint: bool = False

    def __post_init__(self) -> None:
        self.img_size = tuple(int(v) for v in self.img_size)  # type: ignore[assignment]
        self.out_indices = tuple(int(v) for v in self.out_indices)
        h, w = self.img_size
        p = self.patch_size
        if h % p or w % p or (h // p) % 2:
            raise ValueError(f"img_size {self.img_size} must split into an even number of {p}-pixel patch rows")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not self.out_indices or max(self.out_indices) >= self.depth or min(self.out_indices) <= self.merge_index:
            raise ValueError(
                f"out_indices {self.out_indices} must lie after merge_index {self.merge_index} and before depth {self.depth}"
            )
        if self.pretrain_img_size % p:
            raise ValueError(f"pretrain_img_size {self.pretrain_img_size} is not a multiple of patch_size {p}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the whole pair: ``(Hp, Wp)``."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def image_size(self) -> tuple[int, int]:
        """Size of one image of the pair: ``(H, W)``."""
        return self.img_size[0] // 2, self.img_size[1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["out_indices"] = list(self.out_indices)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegGPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SegGPT config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, channels last: ``(B, C, H, W) -> (B, Hp, Wp, D)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head global attention with decomposed relative positions over the ``grid``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, grid: tuple[int, int], impl: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.grid = grid
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, n_heads, L, head_dim)
        out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale, self.impl)
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * noise / keep


def ensemble_query_half(x: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Feature ensemble over prompts: average the query half (bottom patch rows) of ``x``
    ``(B, Hp, Wp, D)`` within each group; the prompt half is untouched.

    ``group_index`` ``(B,)`` gives each sample's group in ``[0, n_groups)``: samples of one group
    are prompts of one query. One group over the whole batch is the official ensemble. The mean
    is accumulated in float32 and cast back to ``x``'s dtype.
    """
    prompt, query = x.split(x.shape[1] // 2, dim=1)
    flat = query.reshape(x.shape[0], -1).float()
    sums = flat.new_zeros(n_groups, flat.shape[1]).index_add_(0, group_index, flat)
    counts = torch.bincount(group_index, minlength=n_groups).clamp_min(1).to(flat.dtype)
    query = (sums / counts[:, None]).index_select(0, group_index).reshape(query.shape).to(x.dtype)
    return torch.cat([prompt, query], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: SegGPTConfig, drop_path_rate: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.grid, cfg.attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = drop_path_rate

    def forward(self, x: torch.Tensor, group_index: torch.Tensor | None = None, n_groups: int = 0) -> torch.Tensor:
        """``group_index`` / ``n_groups``: the feature ensemble on the attention output (see
        :func:`ensemble_query_half`); ``None`` runs every sample on its own."""
        y = self.attn(self.norm1(x))
        if group_index is not None:
            y = ensemble_query_half(y, group_index, n_groups)
        x = x + drop_path(y, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (decoder)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def resize_abs_pos(pos_embed: torch.Tensor, grid: tuple[int, int], has_cls: bool = True) -> torch.Tensor:
    """Bicubically resize a stored ``(1, [1+]n*n, D)`` embedding to ``(1, Hp, Wp, D)`` (cls dropped)."""
    tokens = pos_embed[:, 1:] if has_cls else pos_embed
    side = int(math.isqrt(tokens.shape[1]))
    if side * side != tokens.shape[1]:
        raise ValueError(f"position embedding with {tokens.shape[1]} tokens is not a square grid")
    if (side, side) == tuple(grid):
        return tokens.reshape(1, side, side, -1)
    t = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    t = F.interpolate(t.float(), size=grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return t.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------
# the network
# ------------------------------------------------------------------------------------------
class SegGPT(nn.Module):
    def __init__(self, cfg: SegGPTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SegGPTConfig()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.type_token_cls = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.type_token_ins = nn.Parameter(torch.zeros(1, 1, 1, d))
        n_pos = (cfg.pretrain_img_size // cfg.patch_size) ** 2 + 1  # + cls slot, as stored officially
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d))
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as official
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        dec = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(d * len(cfg.out_indices), cfg.patch_size**2 * dec)
        self.decoder_pred = nn.Sequential(
            nn.Conv2d(dec, dec, kernel_size=3, padding=1),
            LayerNorm2d(dec, eps=cfg.layer_norm_eps),
            nn.GELU(),
            nn.Conv2d(dec, 3, kernel_size=1),
        )
        self.reset_parameters()

    # -- speed --------------------------------------------------------------------------
    def compile_blocks(self, **compile_kwargs: Any) -> "SegGPT":
        """Regional compilation: :func:`torch.compile` each transformer block in place.

        The blocks share one code path, so the compiled graph is reused from block to block:
        compiling costs about one block (seconds) instead of the whole network (minutes on
        ViT-L), while layer norms, GELU, residual adds and the attention's bias terms are still
        fused. Parameter names (``state_dict``) are unchanged. ``compile_kwargs`` go to
        :meth:`torch.nn.Module.compile` (default ``dynamic=False``).
        """
        for blk in self.blocks:
            blk.compile(**{"dynamic": False, **compile_kwargs})
        return self

    # -- init ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Official initialisation: xavier for linears and the patch projection, N(0, .02) tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for t in (self.mask_token, self.segment_token_x, self.segment_token_y, self.type_token_cls, self.type_token_ins):
            nn.init.normal_(t, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- patches ------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, L, p*p*3)``."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, p*p*3) -> (N, 3, H, W)`` on the configured grid."""
        p = self.patch_size
        hp, wp = self.cfg.grid
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], hp, wp, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, hp * p, wp * p)

    # -- forward ------------------------------------------------------------------------
    def forward_encoder(
        self,
        imgs: torch.Tensor,
        tgts: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        seg_type: torch.Tensor,
        merge_between_batch: int = -1,
        group_index: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Features after the ``out_indices`` blocks, normalised.

        ``merge_between_batch >= 0`` turns on the feature ensemble from that block on. The
        batch is then prompts of one query (the official semantics) or, with ``group_index``
        ``(B,)`` (labels ``0..G-1``), prompts of ``G`` queries, each group averaged on its own:
        many queries share one pass. Blocks ``0..merge_index`` hold the image and label streams
        stacked along the batch; the ensemble averages within each (group, stream) there.
        """
        x = self.patch_embed(imgs)
        y = self.patch_embed(tgts)
        b, hp, wp, _ = x.shape
        w = bool_masked_pos.reshape(b, hp, wp, 1).to(y.dtype)
        y = y * (1 - w) + self.mask_token.to(y.dtype) * w
        pos = resize_abs_pos(self.pos_embed, (hp, wp))
        type_emb = torch.where(seg_type.reshape(b, 1, 1, 1) == 1, self.type_token_ins, self.type_token_cls)
        x = x + self.segment_token_x + pos + type_emb
        y = y + self.segment_token_y + pos + type_emb
        x = torch.cat((x, y), dim=0)

        merge = self.cfg.merge_index
        groups: torch.Tensor | None = None
        if merge_between_batch >= 0:
            if group_index is None:
                groups, n_groups = torch.zeros(b, dtype=torch.long, device=x.device), 1
            else:
                groups = group_index.to(device=x.device, dtype=torch.long)
                n_groups = int(groups.max()) + 1 if b else 0
            streams = torch.cat([groups, groups + n_groups])  # blocks up to merge_index: image, label streams
        feats = []
        for i, blk in enumerate(self.blocks):
            ens: tuple = ()
            if groups is not None and i >= merge_between_batch:
                ens = (streams, 2 * n_groups) if i <= merge else (groups, n_groups)
            if self.cfg.use_act_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, *ens, use_reentrant=False)
            else:
                x = blk(x, *ens)
            if i == merge:
                half = x.shape[0] // 2
                x = (x[:half] + x[half:]) * 0.5
            if i in self.cfg.out_indices:
                feats.append(self.norm(x))
        return feats

    def forward_decoder(self, feats: list[torch.Tensor], first_row: int = 0) -> torch.Tensor:
        """Decode features ``(N, Hp, Wp, D)`` to the painted labels ``(N, 3, (Hp - first_row)*p, Wp*p)``.

        ``first_row > 0`` decodes only patch rows ``first_row..Hp-1`` (``Hp // 2``: the query
        half, all that inference needs) and gives exactly those rows of the full decoding: one
        extra patch row above is decoded as context for the 3x3 convolution, then dropped.
        """
        hp_all = feats[0].shape[1]
        if not 0 <= first_row < hp_all:
            raise ValueError(f"first_row must lie in [0, {hp_all}), got {first_row}")
        start = max(first_row - 1, 0)
        x = self.decoder_embed(torch.cat([f[:, start:] for f in feats], dim=-1))  # (N, rows, Wp, p*p*dec)
        p, dec = self.patch_size, self.cfg.decoder_embed_dim
        n, hp, wp, _ = x.shape
        # (N, dec, H, W) in channels-last memory: the copy moves whole (p, dec) rows and the
        # convolutions and LayerNorm2d run without layout conversions (about 2x faster on CPU).
        x = x.reshape(n, hp, wp, p, p, dec).permute(0, 1, 3, 2, 4, 5).reshape(n, hp * p, wp * p, dec)
        out = self.decoder_pred(x.permute(0, 3, 1, 2))
        return out[:, :, (first_row - start) * p :] if first_row > start else out

    def _check_pair(self, imgs: torch.Tensor, tgts: torch.Tensor) -> None:
        if imgs.shape[-2:] != tuple(self.cfg.img_size) or tgts.shape != imgs.shape:
            raise ValueError(
                f"expected imgs and tgts of shape (N, 3, {self.cfg.img_size[0]}, {self.cfg.img_size[1]}), "
                f"got {tuple(imgs.shape)} and {tuple(tgts.shape)}"
            )

    @torch.no_grad()
    def predict_query(
        self,
        imgs: torch.Tensor,
        tgts: torch.Tensor,
        seg_type: torch.Tensor | None = None,
        merge_between_batch: int = -1,
    ) -> torch.Tensor:
        """Inference: the painted query half ``(N, 3, H, W)`` (normalised space).

        The query half of the labels is hidden and only the query rows are decoded, so this
        costs less than :meth:`forward` and equals the bottom half of its prediction.
        """
        n = imgs.shape[0]
        hp, wp = self.cfg.grid
        self._check_pair(imgs, tgts)
        hidden = query_half_mask((hp, wp), n, device=imgs.device)
        if seg_type is None:
            seg_type = torch.zeros(n, dtype=torch.long, device=imgs.device)
        feats = self.forward_encoder(imgs, tgts, hidden, seg_type, merge_between_batch)
        return self.forward_decoder(feats, first_row=hp // 2)

    def forward_loss(
        self, pred: torch.Tensor, tgts: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Smooth-L1 (beta ``loss_beta``) averaged over hidden patches, weighted by ``valid``.

        ``valid`` is a per-pixel weight ``(N, 3, H, W)``: 1 everywhere is the official loss;
        larger weights on defect pixels counter the collapse to all-background.
        """
        p = self.patch_size
        n, _, h, w = pred.shape  # any number of patch rows (see ``first_row`` in forward)
        m = mask.reshape(n, h // p, w // p).to(pred.dtype)
        m = m.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2).unsqueeze(1) * valid
        loss = F.smooth_l1_loss(pred.float(), tgts.float(), reduction="none", beta=self.cfg.loss_beta)
        return (loss * m).sum() / m.sum().clamp_min(1e-12)

    def forward(
        self,
        imgs: torch.Tensor,
        tgts: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        seg_type: torch.Tensor | None = None,
        merge_between_batch: int = -1,
        first_row: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred patches (N, L, p*p*3), bool_masked_pos (N, L))``.

        ``merge_between_batch >= 0`` turns on the feature ensemble from that block on: the
        batch is then several prompts for one query. ``first_row > 0`` decodes and scores only
        patch rows ``first_row..Hp-1`` (``Hp // 2``: the query half, for losses that weight the
        prompt half by 0): the loss covers the hidden patches of those rows and the returned
        patches are those rows' (``(N, (Hp - first_row) * Wp, p*p*3)``).
        """
        n = imgs.shape[0]
        hp, wp = self.cfg.grid
        self._check_pair(imgs, tgts)
        if bool_masked_pos is None:
            bool_masked_pos = torch.zeros(n, hp * wp, dtype=torch.bool, device=imgs.device)
        else:
            bool_masked_pos = bool_masked_pos.flatten(1).to(torch.bool)
        if valid is None:
            valid = torch.ones_like(tgts)
        if seg_type is None:
            seg_type = torch.zeros(n, dtype=torch.long, device=imgs.device)
        feats = self.forward_encoder(imgs, tgts, bool_masked_pos, seg_type, merge_between_batch)
        pred = self.forward_decoder(feats, first_row)
        if first_row:
            rows = slice(first_row * self.patch_size, None)
            tgts, valid = tgts[:, :, rows], valid[:, :, rows]
            scored = bool_masked_pos.reshape(n, hp, wp)[:, first_row:].flatten(1)
        else:
            scored = bool_masked_pos
        loss = self.forward_loss(pred, tgts, scored, valid)
        return loss, self.patchify(pred), bool_masked_pos


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # the official model
    "vit_large": dict(img_size=(896, 448), patch_size=16, embed_dim=1024, depth=24, num_heads=16, out_indices=(5, 11, 17, 23)),
    # smaller ones for CPU work, 448x224 pairs (224x224 per image)
    "vit_base": dict(img_size=(448, 224), patch_size=16, embed_dim=768, depth=12, num_heads=12, out_indices=(3, 5, 8, 11)),
    "vit_small": dict(img_size=(448, 224), patch_size=16, embed_dim=384, depth=12, num_heads=6, out_indices=(3, 5, 8, 11)),
    "vit_tiny": dict(img_size=(448, 224), patch_size=16, embed_dim=192, depth=12, num_heads=3, out_indices=(5, 8, 11), decoder_embed_dim=32),
    # a 64x64-per-image model that learns the synthetic set on a laptop CPU in minutes
    "vit_micro": dict(
        img_size=(128, 64), patch_size=8, embed_dim=128, depth=5, num_heads=4, out_indices=(3, 4),
        merge_index=1, decoder_embed_dim=32, pretrain_img_size=64, drop_path_rate=0.0,
    ),
    # 235 k parameters, 32x32 per image: the one tiny model of the smoke pipeline and the tests
    "vit_nano": dict(
        img_size=(64, 32), patch_size=8, embed_dim=64, depth=3, num_heads=2, out_indices=(2,),
        merge_index=1, decoder_embed_dim=16, pretrain_img_size=32, drop_path_rate=0.0,
    ),
}


def preset_config(preset: str = "vit_large", **overrides: Any) -> SegGPTConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    d = {**PRESETS[preset], **overrides}
    return SegGPTConfig.from_dict(d)


def build_seggpt(preset: str = "vit_large", **overrides: Any) -> SegGPT:
    """Build SegGPT from a preset; overrides use the official constructor's names.

    >>> model = build_seggpt("vit_tiny", depth=4, out_indices=(3,))
    """
    return SegGPT(preset_config(preset, **overrides))
