"""The query rotation table: the model's own RoPE angles, as a pure rotation.

The per-page query rotation of DESIGN §3 turns a query by a small integer angle in
[-(B - 1), L]. It is looked up in the model's own cos/sin table so linear, NTK, llama3 and
YaRN tables work unchanged; the table is divided by its row-0 magnitude because scaled
tables (YaRN) fold an attention factor into cos and sin, which the keys and queries already
carry once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QueryRotation:
    """cos_sin: [L + 1, rotary_dim] float32, cos in the first half, sin in the second.

    rotary_dim may be smaller than head_dim (partial rotary): the rest passes through.
    is_neox_style: rotate-half pairs (i, i + rotary_dim / 2) when True, else interleaved
    pairs (2i, 2i + 1) as in GPT-J.
    """

    cos_sin: torch.Tensor
    rotary_dim: int
    is_neox_style: bool

    @staticmethod
    def from_model_table(cos_sin_cache: torch.Tensor, num_angles: int,
                         is_neox_style: bool) -> "QueryRotation":
        """Angles 0..num_angles-1 of a model's cos/sin cache, normalised to unit length."""
        if cos_sin_cache.shape[0] < num_angles:
            raise ValueError(
                f"lminf: the model's cos/sin table has {cos_sin_cache.shape[0]} rows but the "
                f"query rotation needs {num_angles} (angles up to L inclusive)")
        table = cos_sin_cache[:num_angles].float()
        magnitude = table[0, : table.shape[1] // 2]  # cos(0) * attention factor
        half = table.shape[1] // 2
        table = torch.cat([table[:, :half] / magnitude, table[:, half:] / magnitude], dim=1)
        return QueryRotation(table.contiguous(), cos_sin_cache.shape[1], is_neox_style)

    def with_angles(self, num_angles: int) -> "QueryRotation":
        """The same rotation with rows for angles 0..num_angles-1 (this one if it has them).

        The GPU prefill turns a whole chunk's queries and keys against one anchor, which
        needs angles up to the chunk length, possibly past L. Rows past the table's last row
        (angle L) are composed from the model's own rows, R(k * L + r) = R(L)^k R(r), so a
        scaled table (linear, NTK, YaRN) stays the model's rotation: each frequency turns by
        k times its own angle at L plus its own angle at r. Computed once, in float64.
        """
        rows = self.cos_sin.shape[0]
        if num_angles <= rows:
            return self
        table = self.cos_sin.double()
        half = table.shape[1] // 2
        phase = torch.atan2(table[:, half:], table[:, :half])           # [rows, half]
        last = rows - 1
        angle = torch.arange(rows, num_angles, device=table.device)
        composed = (angle // last)[:, None] * phase[last] + phase[angle % last]
        extra = torch.cat([composed.cos(), composed.sin()], dim=1).to(self.cos_sin.dtype)
        return QueryRotation(torch.cat([self.cos_sin, extra]).contiguous(), self.rotary_dim,
                             self.is_neox_style)

    def to(self, device: torch.device) -> "QueryRotation":
        return QueryRotation(self.cos_sin.to(device), self.rotary_dim, self.is_neox_style)

    def cos_sin_of(self, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [..., rotary_dim / 2], of integer angles (negative allowed)."""
        half = self.rotary_dim // 2
        row = self.cos_sin[angle.abs()]
        sign = torch.where(angle < 0, -1.0, 1.0).unsqueeze(-1)
        return row[..., :half], row[..., half:] * sign


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           is_neox_style: bool) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of x by the angles of (cos, sin).

    x: [..., D]; cos, sin: [..., rotary_dim / 2], broadcastable to x's leading dims.
    y = [x1, x2] * [cos, cos] + [-x2, x1] * [sin, sin] over each rotation pair (x1, x2).
    """
    rotary_dim = 2 * cos.shape[-1]
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if is_neox_style:
        rotated = torch.cat([y1, y2], dim=-1)
    else:
        rotated = torch.stack([y1, y2], dim=-1).flatten(-2)
    if not passthrough.shape[-1]:
        return rotated
    return torch.cat([rotated, passthrough.expand(*rotated.shape[:-1], -1)], dim=-1)

