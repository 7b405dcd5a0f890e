"""Conditional MLP U-Net that predicts the noise added to single-cell latents."""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.diffusion.feature_cache import FeatureCache


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosine half first."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ConditionedBlock(nn.Module):
    """Linear -> (scale by condition, shift by time) -> LayerNorm -> SiLU -> Dropout."""

    def __init__(self, in_dim: int, out_dim: int, time_embed_dim: int, cond_embed_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.time_proj = nn.Linear(time_embed_dim, out_dim)
        self.cond_proj = nn.Linear(cond_embed_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cond_scale: torch.Tensor, time_shift: torch.Tensor) -> torch.Tensor:
        h = torch.addcmul(time_shift, self.linear(x), cond_scale)
        return self.dropout(self.act(self.norm(h)))


def unique_rows(rows: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(rows, dim=0, return_inverse=True)`` for label rows (column k in [0, sizes[k]]).

    Each row is packed into one integer (mixed radix, first column most significant, so the order is
    the same) and the 1-D unique is used: ``unique(dim=0)`` compares rows one by one (hundreds of small
    kernels per batch). Falls back to it when the packed code would not fit in 63 bits.
    """
    radices = [int(size) + 1 for size in sizes]
    if math.prod(radices) >= 2 ** 62:
        return torch.unique(rows, dim=0, return_inverse=True)
    multipliers = []
    place = 1
    for radix in reversed(radices):
        multipliers.append(place)
        place *= radix
    multipliers = torch.tensor(multipliers[::-1], dtype=torch.long, device=rows.device)
    codes, index = torch.unique((rows.long() * multipliers).sum(dim=1), return_inverse=True)
    radix = torch.tensor(radices, dtype=torch.long, device=rows.device)
    return (codes[:, None] // multipliers) % radix, index


def gather_rows(rows: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """``rows[index]`` (``rows`` itself for None) by ``index_select``, whose backward is ``index_add_``:
    on CPU 4x faster than plain indexing's ``index_put_`` (measured, 128 rows gathered from 15)."""
    return rows if index is None else rows.index_select(0, index)


class ConditionScales:
    """Every block's condition scale for a fixed batch of condition rows.

    The projections are evaluated once per DISTINCT condition row and gathered to the batch. They do
    not depend on the timestep, so a sampler builds this once per batch and reuses it at every step.
    """

    def __init__(self, model: "CellUNet", cond: torch.Tensor, gather: bool = True):
        if gather:
            model.check_condition(cond)
            unique_cond, index = unique_rows(cond, model.condition_sizes)
        else:
            unique_cond, index = cond, None
        c_emb = model.embed_condition(unique_cond)
        blocks = list(model.encoder) + list(model.decoder)
        self.batch_size = cond.shape[0]
        self._scales = {id(block): gather_rows(block.cond_proj(c_emb), index) for block in blocks}

    def __call__(self, block: ConditionedBlock) -> torch.Tensor:
        return self._scales[id(block)]


class TimeShifts:
    """Every block's time shift, computed once per DISTINCT timestep of the batch.

    When the whole batch shares one timestep (every sampling step) the shift is a single row that
    broadcasts over the batch, so no per-cell projection or gather happens at all.
    """

    def __init__(self, model: "CellUNet", t: torch.Tensor, gather: bool = True):
        if gather and t.numel() > 0 and bool((t == t[0]).all()):
            unique_t, self.index = t[:1], None
        elif gather:
            unique_t, self.index = torch.unique(t, return_inverse=True)
        else:
            unique_t, self.index = t, None
        self.t_emb = model.embed_time(unique_t)

    def __call__(self, block: ConditionedBlock) -> torch.Tensor:
        return gather_rows(block.time_proj(self.t_emb), self.index)


class CellUNet(nn.Module):
    """Epsilon-predicting MLP U-Net over cell latents with additive skips.

    Encoder blocks E_0..E_{D-1} have widths ``hidden_dims``; decoder block
    Dec_b maps hidden_dims[b+1] -> hidden_dims[b] and
    u_{D-1} = e_{D-1}, u_b = Dec_b(u_{b+1}) + e_b.  A head maps u_0 to epsilon.

    ``cond`` is a LongTensor (B, K): column k holds a class in
    [0, condition_sizes[k]) or the null value condition_sizes[k].
    """

    def __init__(
        self,
        latent_dim: int = 128,
        hidden_dims: Sequence[int] = (512, 512, 256, 128),
        condition_sizes: Sequence[int] = (14,),
        time_embed_dim: int = 128,
        cond_embed_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden_dims = tuple(int(h) for h in hidden_dims)
        condition_sizes = tuple(int(s) for s in condition_sizes)
        if len(hidden_dims) < 2:
            raise ValueError(f"hidden_dims needs at least 2 widths, got {hidden_dims}")
        if not condition_sizes or min(condition_sizes) < 1:
            raise ValueError(f"condition_sizes must be non-empty positive ints, got {condition_sizes}")

        self.latent_dim = int(latent_dim)
        self.hidden_dims = hidden_dims
        self.condition_sizes = condition_sizes
        self.time_embed_dim = int(time_embed_dim)
        self.cond_embed_dim = int(cond_embed_dim)
        self.dropout = float(dropout)

        self.time_embed = nn.Sequential(
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
            nn.SiLU(),
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
        )
        self.cond_embed = nn.Sequential(
            nn.Linear(sum(condition_sizes), self.cond_embed_dim),
            nn.SiLU(),
            nn.Linear(self.cond_embed_dim, self.cond_embed_dim),
        )

        def block(in_dim: int, out_dim: int) -> ConditionedBlock:
            return ConditionedBlock(in_dim, out_dim, self.time_embed_dim, self.cond_embed_dim, self.dropout)

        encoder_inputs = (self.latent_dim,) + hidden_dims[:-1]
        self.encoder = nn.ModuleList(block(i, o) for i, o in zip(encoder_inputs, hidden_dims))
        self.decoder = nn.ModuleList(block(hidden_dims[b + 1], hidden_dims[b]) for b in range(len(hidden_dims) - 1))
        self.head = nn.Sequential(
            nn.Linear(hidden_dims[0], 2 * hidden_dims[0]),
            nn.LayerNorm(2 * hidden_dims[0]),
            nn.SiLU(),
            nn.Linear(2 * hidden_dims[0], self.latent_dim),
        )

    @property
    def depth(self) -> int:
        return len(self.hidden_dims)

    def config(self) -> Dict:
        return {
            "latent_dim": self.latent_dim,
            "hidden_dims": list(self.hidden_dims),
            "condition_sizes": list(self.condition_sizes),
            "time_embed_dim": self.time_embed_dim,
            "cond_embed_dim": self.cond_embed_dim,
            "dropout": self.dropout,
        }

    def validate_branch(self, branch: int) -> None:
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= self.depth - 2:
            raise ValueError(f"cache branch must be an int in [0, {self.depth - 2}] for depth {self.depth}, got {branch!r}")

    def make_cache(self, branch: int) -> FeatureCache:
        """A fresh cache for this model; raises ValueError on an invalid branch."""
        self.validate_branch(branch)
        return FeatureCache(branch)

    def null_condition_row(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.condition_sizes, dtype=torch.long, device=device)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        embedding = timestep_embedding(t, self.time_embed_dim).to(self.time_embed[0].weight.dtype)
        return self.time_embed(embedding)

    def check_condition(self, cond: torch.Tensor) -> None:
        """Raise ValueError unless ``cond`` is (B, K) with column k in [0, condition_sizes[k]]."""
        if cond.dim() != 2 or cond.shape[1] != len(self.condition_sizes):
            raise ValueError(f"cond must have shape (B, {len(self.condition_sizes)}), got {tuple(cond.shape)}")
        cond = cond.long()
        if bool(((cond < 0) | (cond > self.null_condition_row(cond.device))).any()):
            raise ValueError(f"cond values must lie in [0, condition_sizes[k]] per key (sizes {self.condition_sizes})")

    def condition_one_hot(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, K) labels -> (B, sum(condition_sizes)); a null key gives an all-zero block."""
        self.check_condition(cond)
        cond = cond.long()
        blocks = [
            F.one_hot(cond[:, k], num_classes=size + 1)[:, :size]
            for k, size in enumerate(self.condition_sizes)
        ]
        return torch.cat(blocks, dim=1).to(self.cond_embed[0].weight.dtype)

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.cond_embed(self.condition_one_hot(cond))

    def condition_scales(self, cond: torch.Tensor) -> ConditionScales:
        """Condition projections of every block for ``cond``, to reuse across sampling steps."""
        return ConditionScales(self, cond)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        cache: Optional[FeatureCache] = None,
        gather_embeddings: bool = True,
        cond_scales: Optional[ConditionScales] = None,
    ) -> torch.Tensor:
        """Predict epsilon (B, latent_dim).

        cache=None runs the full network without caching. With a cache,
        ``cache.refresh`` selects a full pass that stores u_{branch+1}, otherwise
        a shallow pass through E_0..E_branch reusing the stored feature.
        ``gather_embeddings=False`` is the unoptimised reference path for tests. ``cond_scales``
        (from :meth:`condition_scales` for this ``cond``) skips recomputing the condition projections.
        """
        if cache is not None:
            self.validate_branch(cache.branch)
        shallow = cache is not None and not cache.refresh
        if cond_scales is None:
            cond_scales = ConditionScales(self, cond, gather_embeddings)
        elif cond_scales.batch_size != x.shape[0]:
            raise ValueError(f"cond_scales were built for {cond_scales.batch_size} rows, input has {x.shape[0]}")
        time_shifts = TimeShifts(self, t, gather_embeddings)

        def modulate(block: ConditionedBlock) -> Tuple[torch.Tensor, torch.Tensor]:
            return cond_scales(block), time_shifts(block)
        num_encoder_blocks = cache.branch + 1 if shallow else self.depth

        skips: List[torch.Tensor] = []
        h = x
        for block in self.encoder[:num_encoder_blocks]:
            h = block(h, *modulate(block))
            skips.append(h)

        if shallow:
            if cache.feature is None:
                raise RuntimeError("feature cache is empty: the first step must have cache.refresh=True")
            if cache.feature.shape[0] != x.shape[0]:
                raise ValueError(f"cached feature batch {cache.feature.shape[0]} != input batch {x.shape[0]}")
            u = cache.feature
            top_decoder = cache.branch
        else:
            u = skips[-1]
            top_decoder = self.depth - 2

        for b in range(top_decoder, -1, -1):
            if cache is not None and not shallow and b == cache.branch:
                cache.feature = u.detach()
            decoder_block = self.decoder[b]
            u = decoder_block(u, *modulate(decoder_block)) + skips[b]
        return self.head(u)

    def macs_per_sample(self, shallow: bool = False, branch: Optional[int] = None) -> int:
        """Multiply-adds of the main-path Linear layers for one sample.

        Per-timestep / per-condition embedding and projection work is excluded
        (it is amortised over the batch). ``branch`` is required when shallow.
        """
        if shallow:
            if branch is None:
                raise ValueError("a shallow pass needs a cache branch")
            self.validate_branch(branch)
            encoder_blocks = self.encoder[: branch + 1]
            decoder_blocks = self.decoder[: branch + 1]
        else:
            encoder_blocks = self.encoder
            decoder_blocks = self.decoder
        linears = [blk.linear for blk in encoder_blocks] + [blk.linear for blk in decoder_blocks]
        linears += [m for m in self.head if isinstance(m, nn.Linear)]
        return sum(layer.in_features * layer.out_features for layer in linears)
