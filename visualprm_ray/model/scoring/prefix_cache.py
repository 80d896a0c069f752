"""The ``prefix_cache`` layout: the prefix's K/V copied in front of right-padded candidate rows.

After the prefix forward (:class:`~visualprm_ray.model.scoring.base.PrefixFirstScorer`), a chunk
of candidates runs as one right-padded row each, with the prefix keys/values expanded into the
chunk's own cache and a mask that shows every row the whole prefix, then its own suffix causally.
Plain transformers (a ``DynamicCache`` and an attention mask) with any SDPA or eager kernel; the
price is the prefix K/V copied into every chunk's cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from visualprm_ray.model.group import PreparedGroup
from visualprm_ray.model.scoring.base import PrefixFirstScorer

if TYPE_CHECKING:
    import torch


class PrefixCacheScorer(PrefixFirstScorer):
    mode = "prefix_cache"
    packed_chunks = False

    def _chunk_forward(
        self, group: PreparedGroup, chunk: list[int], lengths: list[int], p: int, prefix_kv: list
    ) -> tuple[torch.Tensor, np.ndarray]:
        """``[candidates * longest, hidden]``, candidate j's tokens from ``j * longest``."""
        import torch
        from transformers import DynamicCache

        n, width = len(chunk), max(lengths)
        self._check_positions(p + width - 1)
        sfx = np.zeros((n, width), dtype=np.int64)
        for j, k in enumerate(chunk):
            sfx[j, : lengths[j]] = group.suffixes[k]
        embeds = self._embed_with_images(sfx, None)
        q = torch.arange(width, device=self.device)
        lens = self._to_device(np.asarray(lengths, dtype=np.int64))
        # [n, 1, query, prefix + key]: the whole prefix, then causal within the own suffix.
        own = (q.view(1, width, 1) >= q.view(1, 1, width)) & (q.view(1, 1, width) < lens.view(n, 1, 1))
        mask = torch.cat([torch.ones(n, width, p, dtype=torch.bool, device=self.device), own], dim=2)
        mask = mask.unsqueeze(1)
        if self.model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=self.device).masked_fill_(
                ~mask, torch.finfo(embeds.dtype).min
            )
        chunk_cache = DynamicCache()
        for layer_idx, (k, v) in enumerate(prefix_kv):
            chunk_cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), layer_idx)
        hidden = self._language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=(p + q).unsqueeze(0).expand(n, width),
            use_cache=True,
            **{self._cache_kwarg: chunk_cache},
        ).last_hidden_state
        return hidden.reshape(n * width, hidden.shape[-1]), np.arange(n) * width
