"""The ``packed`` layout: a group's prefix and its candidates in one row, under a tree-shaped mask.

Each row holds one group's prefix followed by the suffixes of some of its candidates; a token
sees the prefix and the earlier tokens of its own candidate, never another candidate's. Position
ids of every candidate continue from the prefix length, so its hidden states are those of its own
full forward. Rows of several groups share a forward (right-padded to the longest), and any
attention backend can run it: a dense boolean mask for SDPA, an additive one for eager, a
block-sparse one for flex attention (the layout ``auto`` picks with flex). It recomputes the
prefix in every row, so a group split over several rows pays its prefix again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from visualprm_ray.model.group import PreparedGroup
from visualprm_ray.model.scoring.base import LayoutScorer, Scores, unique_candidates

if TYPE_CHECKING:
    import torch


@dataclass
class _Unit:
    """One packed row: a group's prefix plus the suffixes of some of its candidates."""

    group: int
    candidates: list[int]
    length: int


@dataclass
class _Batch:
    units: list[_Unit] = field(default_factory=list)
    width: int = 0


def plan_batches(groups: Sequence[PreparedGroup], token_budget: int) -> list[_Batch]:
    """Split groups into packed rows and rows into batches under ``token_budget`` padded tokens.

    A group whose packed row would exceed the budget is split into several rows, each repeating
    the prefix (rare: the alternative, a prefix cache shared across forwards, costs memory on
    every group to save compute on a few). A single row longer than the budget still runs alone.
    """
    units: list[_Unit] = []
    for g, group in enumerate(groups):
        prefix = len(group.prefix)
        current: list[int] = []
        length = prefix
        for k in unique_candidates(group).values():
            extra = len(group.suffixes[k])
            if current and length + extra > token_budget:
                units.append(_Unit(g, current, length))
                current, length = [], prefix
            current.append(k)
            length += extra
        if current:
            units.append(_Unit(g, current, length))
    # Longest first, so that rows sharing a batch have similar lengths and little padding.
    units.sort(key=lambda u: u.length, reverse=True)
    batches: list[_Batch] = []
    for unit in units:
        batch = batches[-1] if batches else None
        if batch is None or (len(batch.units) + 1) * batch.width > token_budget:
            batch = _Batch(width=unit.length)
            batches.append(batch)
        batch.units.append(unit)
    return batches


def tree_attention_mask(seg: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """The packed rows' attention mask from segment ids (0 = prefix, j = candidate j, -1 = padding).

    A token sees earlier tokens of the prefix and of its own segment. Padding sees the prefix and
    padding, so no query row is empty (an empty row gives NaN in SDPA); nothing attends to it.
    sdpa gets a dense boolean mask, eager an additive one, flex attention a block-sparse mask that
    skips the blocks where candidates would see each other.
    """
    import torch

    rows, width = seg.shape
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return (kv <= q) & ((seg[b, kv] == 0) | (seg[b, kv] == seg[b, q]))

        return create_block_mask(mask_mod, rows, None, width, width, device=seg.device)
    idx = torch.arange(width, device=seg.device)
    causal = idx.view(1, width) <= idx.view(width, 1)  # [query, key]
    same_branch = (seg.unsqueeze(1) == seg.unsqueeze(2)) | (seg.unsqueeze(1) == 0)
    mask = (causal.unsqueeze(0) & same_branch).unsqueeze(1)  # [rows, 1, query, key]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    return mask


class PackedScorer(LayoutScorer):
    mode = "packed"

    def _score_into(self, groups: Sequence[PreparedGroup], results: Scores) -> None:

        batches = plan_batches(groups, self.token_budget)
        remaining: dict[int, int] = {}
        for batch in batches:
            for unit in batch.units:
                remaining[unit.group] = remaining.get(unit.group, 0) + 1
        features: dict[int, torch.Tensor] = {}
        for batch in batches:
            # Encode every image of this batch's groups once, all tiles together; a group split
            # over several rows reuses its features until its last row is done.
            needed = [u.group for u in batch.units if u.group not in features and len(groups[u.group].tiles)]
            needed = list(dict.fromkeys(needed))
            if needed:
                encoded = self.encode_groups([groups[g].tiles for g in needed])
                features.update(zip(needed, encoded, strict=True))
            for unit, scores in self._forward_batch(batch, groups, features):
                for k, s in zip(unit.candidates, scores, strict=True):
                    results[unit.group][k] = s
                remaining[unit.group] -= 1
                if not remaining[unit.group]:
                    features.pop(unit.group, None)

    def _forward_batch(
        self, batch: _Batch, groups: Sequence[PreparedGroup], features: dict[int, torch.Tensor]
    ) -> list[tuple[_Unit, list[np.ndarray]]]:
        import torch

        rows, width = len(batch.units), batch.width
        ids = torch.zeros(rows, width, dtype=torch.long)
        pos = torch.zeros(rows, width, dtype=torch.long)
        seg = torch.full((rows, width), -1, dtype=torch.long)
        gather_rows, gather_cols, splits = [], [], []
        for r, unit in enumerate(batch.units):
            group = groups[unit.group]
            p = len(group.prefix)
            ids[r, :p] = torch.from_numpy(group.prefix)
            pos[r, :p] = torch.arange(p)
            seg[r, :p] = 0
            offset = p
            for j, k in enumerate(unit.candidates):
                suffix = group.suffixes[k]
                n = len(suffix)
                ids[r, offset : offset + n] = torch.from_numpy(suffix)
                pos[r, offset : offset + n] = torch.arange(p, p + n)
                seg[r, offset : offset + n] = j + 1
                # Score positions are indices into the candidate's own full sequence; map the
                # ones past the prefix into this candidate's slot of the packed row.
                full = group.positions[k]
                gather_cols.append(np.where(full < p, full, full - p + offset))
                gather_rows.append(np.full(len(full), r))
                splits.append(len(full))
                offset += n
        self._check_positions(int(pos.max()))
        pos, seg = self._to_device(pos.numpy()), self._to_device(seg.numpy())

        # Rows are filled in unit order, so the units' features concatenated line up with the rows'
        # image tokens in row-major order.
        row_features = [features[u.group] for u in batch.units if u.group in features]
        embeds = self._embed_with_images(ids.numpy(), torch.cat(row_features) if row_features else None)

        mask = tree_attention_mask(seg, self.model.config._attn_implementation, embeds.dtype)
        hidden = self._language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False
        ).last_hidden_state

        r_idx = self._to_device(np.concatenate(gather_rows))
        c_idx = self._to_device(np.concatenate(gather_cols))
        probs = self._p_plus(hidden[r_idx, c_idx])
        per_candidate = np.split(probs, np.cumsum(splits)[:-1])
        out, start = [], 0
        for unit in batch.units:
            out.append((unit, per_candidate[start : start + len(unit.candidates)]))
            start += len(unit.candidates)
        return out
