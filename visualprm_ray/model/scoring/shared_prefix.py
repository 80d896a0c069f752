"""The ``shared_prefix`` layout: a chunk of candidates attends to one copy of the group's prefix K/V.

In ``prefix_cache`` mode each candidate chunk gets the prefix keys/values copied into its own cache
(n candidates x ~3.5k prefix tokens x every layer), and the concatenation showed up as ~10% of
device time on an H200 (docs/PERFORMANCE.md). Here the attention of a chunk is split in two exact
parts instead (:mod:`visualprm_ray.model.scoring.attention`):

- every query of every candidate against the one shared prefix K/V, with no mask (a candidate
  sees the whole prefix): one attention call over all of the chunk's queries;
- each candidate against its own keys, causally;

merged by their log-sum-exps.

The chunk's candidates are packed into one row without padding (:class:`Packing`), so every
projection, MLP and norm of the layer runs on real tokens only. Only the candidates' own causal
attention, a small part of the work, runs on a padded ``[candidates, longest]`` copy of their
queries/keys/values, because that is the form the standard kernels take.

The attention function is registered with transformers' attention interface under :data:`NAME`;
without the ``visualprm_prefix`` keyword (the prefix forward, the vision tower) it is plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from visualprm_ray.model.group import PreparedGroup
from visualprm_ray.model.scoring import attention
from visualprm_ray.model.scoring.base import PrefixFirstScorer
from visualprm_ray.model.scoring.options import Attention, Merge

if TYPE_CHECKING:
    import torch

NAME = "visualprm_shared_prefix"


@dataclass(frozen=True, eq=False)
class Packing:
    """Where a chunk's candidates sit in its one packed row, and how their attention is computed.

    Candidate ``j`` holds ``lengths[j]`` consecutive tokens of the row, in order. ``index`` maps each
    token of the row to its slot ``j * width + i`` in the padded ``[candidates, width]`` layout the
    causal kernel runs on (``width`` = the longest candidate). With ``attention="varlen"`` the
    padded layout is never built: ``cumulative`` holds the candidates' offsets and the prefix's
    (``[0, tokens]`` against ``[0, prefix]``) as int32 device tensors, copied once per chunk
    rather than once per layer.
    """

    lengths: tuple[int, ...]
    width: int
    index: torch.Tensor | None  # [tokens] int64, on the model's device (padded attention only)
    prefix: int = 0
    attention: Attention = "padded"
    merge: Merge = "eager"
    # varlen only: the candidates' offsets, then [0, tokens] and [0, prefix] for the prefix part.
    cumulative: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(
        cls,
        lengths: list[int],
        device: torch.device | str,
        *,
        prefix: int = 0,
        attention: Attention = "padded",
        merge: Merge = "eager",
        to_device=None,
    ) -> Packing:
        import torch

        move = to_device or (lambda array: torch.from_numpy(array).to(device))
        width = max(lengths)
        if attention == "varlen":
            offsets = np.asarray(cls.segment_offsets(lengths), dtype=np.int32)
            # One host-to-device copy for the three offset lists.
            both = move(np.concatenate([offsets, np.array([0, offsets[-1], 0, prefix], dtype=np.int32)]))
            n = len(offsets)
            cumulative = (both[:n], both[n : n + 2], both[n + 2 :])
            return cls(tuple(lengths), width, None, prefix, attention, merge, cumulative)
        slots = np.concatenate([j * width + np.arange(n) for j, n in enumerate(lengths)])
        return cls(tuple(lengths), width, move(slots), prefix, attention, merge)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @staticmethod
    def segment_offsets(lengths) -> list[int]:
        """Where each non-empty candidate starts in the row, and the row's end. An empty candidate
        (its conversation is the prefix itself) has no queries or keys: it is no segment at all,
        which is what the kernels need (a zero-length segment crashes the CPU flash kernel)."""
        ends = np.cumsum([n for n in lengths if n]).tolist()
        return [0, *ends]

    def offsets(self) -> list[int]:
        return self.segment_offsets(self.lengths)

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, heads, tokens, D]`` (packed) to ``[candidates, heads, width, D]``, zeros after each end."""
        _, heads, _, dim = x.shape
        n = len(self.lengths)
        padded = x.new_zeros(n * self.width, heads, dim)
        padded[self.index] = x[0].transpose(0, 1)
        return padded.view(n, self.width, heads, dim).transpose(1, 2)

    def to_packed(self, x: torch.Tensor) -> torch.Tensor:
        """``[candidates, heads, width, ...]`` back to ``[1, heads, tokens, ...]``, padding dropped."""
        n, heads, width = x.shape[:3]
        flat = x.transpose(1, 2).reshape(n * width, heads, *x.shape[3:])
        return flat.index_select(0, self.index).transpose(0, 1).unsqueeze(0)


def shared_prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: a packed row's ``[1, H, tokens, D]`` queries -> ``[1, tokens, H, D]``.

    With ``visualprm_prefix`` (per layer, the prefix's ``[1, kv heads, prefix, D]`` keys and values)
    and ``visualprm_packing`` (a :class:`Packing`), the row is a chunk of candidates packed end to
    end; the mask transformers would build is not needed and is ignored.
    """
    prefix = kwargs.pop("visualprm_prefix", None)
    packing: Packing | None = kwargs.pop("visualprm_packing", None)
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if packing is None or query.shape[0] != 1 or query.shape[2] != packing.tokens:
        raise ValueError("shared-prefix attention takes one packed row and the Packing that describes it")
    dim = query.shape[-1]
    scale = scaling if scaling is not None else dim**-0.5
    prefix_key, prefix_value = prefix[module.layer_idx]  # [1, kv heads, prefix, D]
    if packing.attention == "varlen":
        # [tokens, heads, D] views of the row: no copies, no padding, grouped heads as they are.
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        pk, pv = prefix_key[0].transpose(0, 1), prefix_value[0].transpose(0, 1)
        own_cu, prefix_q_cu, prefix_k_cu = packing.cumulative or (None, None, None)
        prefix_cumulative = None if prefix_q_cu is None else (prefix_q_cu, prefix_k_cu)
        shared = attention.varlen_attention_with_lse(
            q,
            pk,
            pv,
            [0, packing.tokens],
            [0, pk.shape[0]],
            scale,
            causal=False,
            cumulative=prefix_cumulative,
        )
        starts = packing.offsets()
        own = attention.varlen_attention_with_lse(
            q,
            k,
            v,
            starts,
            starts,
            scale,
            causal=True,
            cumulative=None if own_cu is None else (own_cu, own_cu),
        )
    else:
        # Every token of the row against the single prefix copy: no mask, one call.
        out, lse = attention.attention_with_lse(query, prefix_key, prefix_value, scale, causal=False)
        shared = (out[0].transpose(0, 1), lse[0])
        own_out, own_lse = attention.attention_with_lse(
            packing.to_padded(query), packing.to_padded(key), packing.to_padded(value), scale, causal=True
        )
        # Right padding is never seen by a real query (causal), and padded queries are dropped here.
        own = (
            packing.to_packed(own_out)[0].transpose(0, 1),
            packing.to_packed(own_lse.unsqueeze(-1))[0, ..., 0],
        )
    merge = attention.compiled_merge_pair() if packing.merge == "compiled" else attention.merge_pair
    return merge(*shared, *own).unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of :data:`NAME`: the attention above applies its own structure, so
    transformers is spared building a ``[tokens, tokens]`` mask for the packed row."""
    return None


def register() -> None:
    """Make :data:`NAME` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, _no_mask)


class SharedPrefixScorer(PrefixFirstScorer):
    mode = "shared_prefix"
    packed_chunks = True

    def __init__(self, checkpoint, **kwargs: Any) -> None:
        super().__init__(checkpoint, **kwargs)
        register()

    def _chunk_forward(
        self, group: PreparedGroup, chunk: list[int], lengths: list[int], p: int, prefix_kv: list
    ) -> tuple[torch.Tensor, np.ndarray]:
        """``[tokens, hidden]`` of the chunk packed end to end in one row, no padding.

        No cache and no mask: the attention function reads the prefix K/V per layer and applies
        causality within each candidate itself. The implementation is switched for this forward
        only, so the prefix forward and other scorers on the same model are untouched (one model
        is not scored from two threads at once: the score stage keeps its torch work on one).
        """
        import torch

        ids = np.concatenate([group.suffixes[k] for k in chunk])
        self._check_positions(p + max(lengths) - 1)
        # Each candidate's positions continue from the prefix, as in its own full sequence.
        positions = self._to_device(np.concatenate([np.arange(p, p + n) for n in lengths]))
        packing = Packing.of(
            lengths,
            self.device,
            prefix=p,
            attention=self.options.attention,
            merge=self.options.merge,
            to_device=self._to_device,
        )
        # The attention above ignores the mask. Given none, transformers looks for packed
        # sequences in the position ids and reads the answer back from the device; a 4-D
        # placeholder is taken as an already prepared mask and passed through untouched.
        mask = None
        if self.options.host_syncs == "avoid":
            mask = torch.empty(1, 1, 0, 0, dtype=torch.bool, device=self.device)
        config = self._language_model.config
        before = config._attn_implementation
        config._attn_implementation = NAME
        try:
            hidden = self._language_model(
                inputs_embeds=self._embed_with_images(ids[None, :], None),
                attention_mask=mask,
                position_ids=positions.unsqueeze(0),
                use_cache=False,
                visualprm_prefix=prefix_kv,
                visualprm_packing=packing,
            ).last_hidden_state[0]
        finally:
            config._attn_implementation = before
        return hidden, np.cumsum([0, *lengths[:-1]])
