"""The fast scorer: each image encoded once, each group's shared prefix computed once (SPEC §3).

Upstream scores a group of N candidates with N full forwards, each re-encoding the image and
re-reading the ~3.5k-token prefix. Here the common token prefix runs once and every candidate's
suffix is computed against it, with position ids that continue from the prefix length. Causal
attention makes every candidate's hidden states identical to those of its own full forward, so
the scores are the same numbers for a fraction of the work. Three layouts do that (``PrefixMode``):
one packed row per group with a tree-shaped mask (``packed``); the prefix's K/V copied in front of
right-padded candidate rows (``prefix_cache``); or candidates packed end to end in one row without
padding, attending to one copy of the prefix K/V (``shared_prefix``, :mod:`visualprm_ray.attention`).
Work is cut by a token budget rather than a row count, and P(+) is computed from the two logits
of '+' and '-' only, in float32, at the score positions only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from visualprm_ray.group import ContextPolicy, PreparedGroup, RowError, candidate_steps, prepare_group

if TYPE_CHECKING:
    import torch

    from visualprm_ray.checkpoint import LoadedCheckpoint
    from visualprm_ray.storage import StorageOptions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_VISION_BATCH = 16
# packed: one row per group, tree mask (any attention backend, groups batched together);
# prefix_cache: prefix forward once, candidates against its K/V (attention never spans candidates).
# shared_prefix: the same, with a chunk's candidates packed into one row without padding and
# attending to one shared copy of the prefix K/V (visualprm_ray.attention).
PrefixMode = Literal["auto", "packed", "prefix_cache", "shared_prefix"]


@dataclass
class ScoredResponse:
    """One candidate's result, in the caller's input order."""

    response: str | list[str]
    steps: list[str]
    step_scores: list[float]
    score: float | None  # mean of step_scores; None when the candidate could not be scored
    score_min: float | None = None
    score_last: float | None = None
    error: str | None = None
    error_kind: str | None = None  # one of visualprm_ray.errors.ERROR_KINDS when error is set
    truncated: bool = False  # only the leading steps that fit the context were scored


def normalize_tiles(tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NHWC tiles to normalised NCHW pixels: x/255, ImageNet mean/std in float32, then dtype."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device).view(1, 3, 1, 1)
    pixels = tiles.permute(0, 3, 1, 2).float().div_(255.0)
    return ((pixels - mean) / std).to(dtype)


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


def unique_candidates(group: PreparedGroup) -> dict[bytes, int]:
    """Scorable candidates keyed by their token suffix, first occurrence kept.

    Duplicate responses are common in sampled rollouts; scoring one copy is cheaper, and it makes
    identical responses tie exactly (a second copy elsewhere in the packed row would differ in the
    last float bits), so a stable ranking keeps them in input order.
    """
    first: dict[bytes, int] = {}
    for k in range(group.num_candidates):
        if group.scorable(k):
            first.setdefault(group.suffixes[k].tobytes(), k)
    return first


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


class GroupScorer:
    """Scores prepared groups on one device with one model replica."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        vision_batch: int = DEFAULT_VISION_BATCH,
        mode: PrefixMode = "auto",
        sdpa_kernels: Literal["default", "no_cudnn"] = "no_cudnn",
    ) -> None:
        import inspect

        import torch

        self.model = checkpoint.model
        self.sdpa_kernels = sdpa_kernels
        attn = self.model.config._attn_implementation
        device_type = next(self.model.parameters()).device.type
        # The prefix once beats the packed tree wherever it applies (measured on CPU and GPU,
        # docs/PERFORMANCE.md); flex attention expresses the packed tree block-sparsely, so it
        # keeps the packed rows. Sharing the prefix K/V without copies (shared_prefix) measured
        # faster on CPU; on CUDA it waits for a GPU measurement, so prefix_cache stays there.
        if mode == "auto":
            mode = (
                "packed"
                if attn == "flex_attention"
                else "shared_prefix"
                if device_type == "cpu"
                else "prefix_cache"
            )
        self.mode = mode
        self.tokenizer = checkpoint.tokenizer
        self.info = checkpoint.info
        self.token_budget = token_budget
        self.vision_batch = vision_batch
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        lm_head = self.model.get_output_embeddings().weight
        ids = torch.tensor([self.tokenizer.plus_id, self.tokenizer.minus_id], device=lm_head.device)
        # Only the '+' and '-' rows of the output head are ever needed: [2, hidden] in float32.
        self._pm_head = lm_head.index_select(0, ids).float()
        self._embed = self.model.get_input_embeddings()
        self._language_model = self.model.model.language_model
        self._tokens_per_tile = self.info.image_tokens_per_tile
        if self.mode in ("prefix_cache", "shared_prefix") and attn not in ("sdpa", "eager"):
            raise ValueError(f"{self.mode} mode needs sdpa or eager attention")
        if self.mode == "shared_prefix":
            from visualprm_ray import attention

            attention.register()
        # transformers renamed the forward's cache argument (past_key_values -> cache) within 5.x.
        params = inspect.signature(self._language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def _attention_kernels(self):
        """SDPA backends for this scorer's forwards.

        cuDNN's attention builds an execution plan per new shape; with every group's lengths
        different, a batch job pays that on almost every call. ``sdpa_kernels="no_cudnn"`` keeps
        PyTorch's flash (causal prefix) and memory-efficient (masked) kernels instead.
        """
        import contextlib

        if self.sdpa_kernels != "no_cudnn" or self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    # -- vision --------------------------------------------------------------------------------

    def encode_tiles(self, tiles: np.ndarray) -> torch.Tensor:
        """Image features for uint8 tiles [T, H, W, 3]: [T * tokens_per_tile, hidden]."""
        import warnings

        import torch

        feats = []
        for start in range(0, len(tiles), self.vision_batch):
            with warnings.catch_warnings():
                # In the job, tiles are read-only views of the Arrow buffer they arrived in; torch
                # warns on every worker. They are only read here (copied to the device, or turned
                # into new float pixels by normalize_tiles), never written.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                chunk = torch.from_numpy(tiles[start : start + self.vision_batch])
            if self.device.type == "cuda":
                # Pinned host memory lets the copy run asynchronously, behind the previous chunk's work.
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            else:
                chunk = chunk.to(self.device)
            out = self.model.model.get_image_features(pixel_values=normalize_tiles(chunk, self.dtype))
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            feats.append(out.reshape(-1, out.shape[-1]))
        return torch.cat(feats)

    def encode_groups(self, tiles: list[np.ndarray]) -> list[torch.Tensor]:
        """Features of several groups' tiles through shared vision forwards, split back per group
        (each entry non-empty)."""
        import torch

        encoded = self.encode_tiles(tiles[0] if len(tiles) == 1 else np.concatenate(tiles))
        return list(torch.split(encoded, [len(t) * self._tokens_per_tile for t in tiles]))

    # -- language model -------------------------------------------------------------------------

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
        ids, pos, seg = ids.to(self.device), pos.to(self.device), seg.to(self.device)

        # Rows are filled in unit order, so the units' features concatenated line up with the rows'
        # image tokens in row-major order.
        row_features = [features[u.group] for u in batch.units if u.group in features]
        embeds = self._embed_with_images(ids, torch.cat(row_features) if row_features else None)

        mask = tree_attention_mask(seg, self.model.config._attn_implementation, embeds.dtype)
        hidden = self._language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False
        ).last_hidden_state

        r_idx = torch.from_numpy(np.concatenate(gather_rows)).to(self.device)
        c_idx = torch.from_numpy(np.concatenate(gather_cols)).to(self.device)
        probs = self._p_plus(hidden[r_idx, c_idx])
        per_candidate = np.split(probs, np.cumsum(splits)[:-1])
        out, start = [], 0
        for unit in batch.units:
            out.append((unit, per_candidate[start : start + len(unit.candidates)]))
            start += len(unit.candidates)
        return out

    def _embed_with_images(self, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        embeds = self._embed(ids)
        image_mask = ids == self.info.image_token_id
        count = int(image_mask.sum())
        if count != (0 if features is None else features.shape[0]):
            raise AssertionError(
                f"{count} image tokens for {0 if features is None else features.shape[0]} features"
            )
        if count:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    def _p_plus(self, hidden: torch.Tensor) -> np.ndarray:
        logits = hidden.float() @ self._pm_head.T  # [N, 2]: z_plus, z_minus
        return torch_softmax_first(logits)

    def _score_group_with_prefix_cache(self, group: PreparedGroup, features) -> dict[int, np.ndarray]:
        """One prefix forward (plain causal attention, its K/V kept), then candidates in chunks
        against that K/V: attention never spans two candidates, and a long group never recomputes
        its prefix."""
        import torch
        from transformers import DynamicCache

        candidates = list(unique_candidates(group).values())
        if not candidates:
            return {}
        p = len(group.prefix)
        ids = torch.from_numpy(group.prefix).to(self.device).unsqueeze(0)
        cache = DynamicCache()
        out = self._language_model(
            inputs_embeds=self._embed_with_images(ids, features),
            position_ids=torch.arange(p, device=self.device).unsqueeze(0),
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        prefix_hidden = out.last_hidden_state[0]
        layers = cache.layers if hasattr(cache, "layers") else None
        prefix_kv = (
            [(layer.keys, layer.values) for layer in layers]
            if layers is not None
            else list(zip(cache.key_cache, cache.value_cache, strict=True))
        )
        results: dict[int, np.ndarray] = {}
        packed = self.mode == "shared_prefix"
        for chunk in _chunks_by_budget(candidates, group, self.token_budget, packed=packed):
            lengths = [len(group.suffixes[k]) for k in chunk]
            suffix_hidden, starts = None, np.zeros(len(chunk), dtype=np.int64)
            if max(lengths):
                if packed:
                    suffix_hidden = self._shared_prefix_forward(group, chunk, lengths, p, prefix_kv)
                    starts = np.cumsum([0, *lengths[:-1]])
                else:
                    suffix_hidden = self._cached_prefix_forward(
                        group, chunk, lengths, p, prefix_kv, prefix_hidden.dtype
                    )
                    starts = np.arange(len(chunk)) * max(lengths)
            positions = [group.positions[k] for k in chunk]
            probs = self._p_plus(_score_rows(prefix_hidden, suffix_hidden, positions, starts, p))
            for k, part in zip(
                chunk, np.split(probs, np.cumsum([len(x) for x in positions])[:-1]), strict=True
            ):
                results[k] = part
        return results

    def _cached_prefix_forward(self, group, chunk, lengths, p, prefix_kv, dtype) -> torch.Tensor:
        """Suffix hidden states of a chunk, right-padded rows with the prefix K/V copied into the
        chunk's cache: ``[candidates * longest, hidden]``, candidate j's tokens from ``j * longest``."""
        import torch
        from transformers import DynamicCache

        n, width = len(chunk), max(lengths)
        sfx = torch.zeros(n, width, dtype=torch.long)
        for j, k in enumerate(chunk):
            sfx[j, : lengths[j]] = torch.from_numpy(group.suffixes[k])
        sfx = sfx.to(self.device)
        q = torch.arange(width, device=self.device)
        lens = torch.tensor(lengths, device=self.device)
        # [n, 1, query, prefix + key]: the whole prefix, then causal within the own suffix.
        own = (q.view(1, width, 1) >= q.view(1, 1, width)) & (q.view(1, 1, width) < lens.view(n, 1, 1))
        mask = torch.cat([torch.ones(n, width, p, dtype=torch.bool, device=self.device), own], dim=2)
        mask = mask.unsqueeze(1)
        if self.model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill_(
                ~mask, torch.finfo(dtype).min
            )
        chunk_cache = DynamicCache()
        for layer_idx, (k, v) in enumerate(prefix_kv):
            chunk_cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), layer_idx)
        hidden = self._language_model(
            inputs_embeds=self._embed_with_images(sfx, None),
            attention_mask=mask,
            position_ids=(p + q).unsqueeze(0).expand(n, width),
            use_cache=True,
            **{self._cache_kwarg: chunk_cache},
        ).last_hidden_state
        return hidden.reshape(n * width, hidden.shape[-1])

    def _shared_prefix_forward(self, group, chunk, lengths, p, prefix_kv) -> torch.Tensor:
        """Suffix hidden states of a chunk packed end to end in one row, attending to the one prefix
        K/V (visualprm_ray.attention): ``[tokens, hidden]``, no padding.

        No cache and no mask: the attention function reads the prefix K/V per layer and applies
        causality within each candidate itself. The implementation is switched for this forward
        only, so the prefix forward and other scorers on the same model are untouched (one model
        is not scored from two threads at once: the score stage keeps its torch work on one).
        """
        import torch

        from visualprm_ray import attention

        ids = torch.from_numpy(np.concatenate([group.suffixes[k] for k in chunk])).to(self.device)
        # Each candidate's positions continue from the prefix, as in its own full sequence.
        positions = torch.from_numpy(np.concatenate([np.arange(p, p + n) for n in lengths])).to(self.device)
        config = self._language_model.config
        before = config._attn_implementation
        config._attn_implementation = attention.NAME
        try:
            return self._language_model(
                inputs_embeds=self._embed_with_images(ids.unsqueeze(0), None),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
                visualprm_prefix=prefix_kv,
                visualprm_packing=attention.Packing.of(lengths, self.device),
            ).last_hidden_state[0]
        finally:
            config._attn_implementation = before

    def score(self, groups: Sequence[PreparedGroup]) -> list[list[np.ndarray | None]]:
        """Step scores per group, per candidate (None for candidates with an error)."""
        if self.mode in ("prefix_cache", "shared_prefix"):
            return self._score_prefix_cache(groups)
        return self._score_packed(groups)

    def _score_prefix_cache(self, groups: Sequence[PreparedGroup]) -> list[list[np.ndarray | None]]:
        import torch

        results: list[list[np.ndarray | None]] = [[None] * g.num_candidates for g in groups]
        with torch.inference_mode(), self._attention_kernels():
            for g, (group, features) in enumerate(zip(groups, self._features_by_window(groups), strict=True)):
                for k, s in self._score_group_with_prefix_cache(group, features).items():
                    results[g][k] = s
        return _copy_duplicates(groups, results)

    def _features_by_window(self, groups: Sequence[PreparedGroup]) -> Iterator[torch.Tensor | None]:
        """Each group's image features, in order, with the tiles of consecutive groups encoded
        together up to ``vision_batch`` tiles per vision forward.

        Groups of one or a few tiles (small images) then share vision forwards instead of each
        running its own small one; at most a window's features are held beyond the group being
        scored, so a large batch of groups never holds all of its image features at once.
        """
        start = 0
        while start < len(groups):
            end, tiles = start + 1, len(groups[start].tiles)
            while end < len(groups) and tiles + len(groups[end].tiles) <= self.vision_batch:
                tiles += len(groups[end].tiles)
                end += 1
            window = [groups[g].tiles for g in range(start, end) if len(groups[g].tiles)]
            encoded = iter(self.encode_groups(window) if window else ())
            for g in range(start, end):
                yield next(encoded) if len(groups[g].tiles) else None
            start = end

    def _score_packed(self, groups: Sequence[PreparedGroup]) -> list[list[np.ndarray | None]]:
        import torch

        results: list[list[np.ndarray | None]] = [[None] * g.num_candidates for g in groups]
        batches = plan_batches(groups, self.token_budget)
        remaining: dict[int, int] = {}
        for batch in batches:
            for unit in batch.units:
                remaining[unit.group] = remaining.get(unit.group, 0) + 1
        features: dict[int, torch.Tensor] = {}
        with torch.inference_mode(), self._attention_kernels():
            for batch in batches:
                # Encode every image of this batch's groups once, all tiles together; a group split
                # over several rows reuses its features until its last row is done.
                needed = [
                    u.group for u in batch.units if u.group not in features and len(groups[u.group].tiles)
                ]
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
        return _copy_duplicates(groups, results)


def _copy_duplicates(groups, results):
    """Duplicates were scored once (see :func:`unique_candidates`); give every copy the result."""
    for g, group in enumerate(groups):
        first = unique_candidates(group)
        for k in range(group.num_candidates):
            if group.scorable(k):
                results[g][k] = results[g][first[group.suffixes[k].tobytes()]]
    return results


def _chunks_by_budget(
    candidates: list[int], group: PreparedGroup, budget: int, *, packed: bool = False
) -> list[list[int]]:
    """Consecutive candidate chunks, longest first, that fit the token budget.

    Right-padded rows (``prefix_cache``) count rows x longest. Packed rows (``shared_prefix``) count
    their real tokens; their own-attention step still runs on a padded copy, so rows x longest is
    kept within twice the budget there, which bounds its memory when lengths differ widely.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    width = tokens = 0
    for k in sorted(candidates, key=lambda k: -len(group.suffixes[k])):
        n = len(group.suffixes[k])
        padded = (len(current) + 1) * max(width, n)
        over = (tokens + n > budget or padded > 2 * budget) if packed else padded > budget
        if current and over:
            chunks.append(current)
            current, width, tokens = [], 0, 0
        current.append(k)
        width, tokens = max(width, n), tokens + n
    if current:
        chunks.append(current)
    return chunks


def _score_rows(
    prefix_hidden: torch.Tensor,
    suffix_hidden: torch.Tensor | None,
    positions: list[np.ndarray],
    starts: np.ndarray,
    p: int,
) -> torch.Tensor:
    """Hidden states at every score position of a chunk's candidates, in order.

    ``positions[j]`` index candidate j's full sequence: below ``p`` they are read from the prefix,
    the others from ``suffix_hidden`` rows ``starts[j] + position - p``. The indices are built on
    the host, so nothing here waits for the device.
    """
    import torch

    pos = np.concatenate(positions)
    in_prefix = pos < p
    out = prefix_hidden.new_empty(len(pos), prefix_hidden.shape[-1])
    device = prefix_hidden.device

    def index(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)

    rows = np.nonzero(in_prefix)[0]
    out[index(rows)] = prefix_hidden[index(pos[rows])]
    rows = np.nonzero(~in_prefix)[0]
    if len(rows):
        owner = np.repeat(starts, [len(x) for x in positions])
        out[index(rows)] = suffix_hidden[index(owner[rows] + pos[rows] - p)]
    return out


def torch_softmax_first(logits) -> np.ndarray:
    """P(+) = softmax over the two logits [z_plus, z_minus], first entry, as float32 numpy."""
    import torch

    return torch.softmax(logits, dim=-1)[:, 0].cpu().numpy().astype(np.float32)


class VisualPRM:
    """VisualPRM-8B as a Python object: score a question's candidate responses, step by step.

    >>> prm = VisualPRM.from_pretrained("/path/to/checkpoint", device="cpu", dtype="float32")
    >>> results = prm.score("What is 2+2?", ["2+2 is 4.\\n\\nSo the answer is 4."])  # doctest: +SKIP
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        vision_batch: int = DEFAULT_VISION_BATCH,
        prefix_mode: PrefixMode = "auto",
        max_tiles: int | None = None,
        max_pixels: int | None = None,
        system_message: str | None = None,
        context_policy: ContextPolicy = "error",
    ) -> None:
        from visualprm_ray.images import DEFAULT_MAX_PIXELS

        self.checkpoint = checkpoint
        self.info = checkpoint.info
        self.tokenizer = checkpoint.tokenizer
        self.scorer = GroupScorer(
            checkpoint, token_budget=token_budget, vision_batch=vision_batch, mode=prefix_mode
        )
        self.max_tiles = max_tiles or self.info.max_tiles
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.system_message = self.info.system_message if system_message is None else system_message
        self.context_policy: ContextPolicy = context_policy

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        device: str = "cuda",
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa",
        **kwargs: Any,
    ) -> VisualPRM:
        """Load from a local directory (upstream or native layout) or a hub id; never runs its code."""
        from visualprm_ray.checkpoint import load_checkpoint

        directory = resolve_model_source(source)
        checkpoint = load_checkpoint(
            directory, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
        return cls(checkpoint, **kwargs)

    def tile(self, images: Any) -> list[np.ndarray]:
        from visualprm_ray.images import load_image
        from visualprm_ray.tiling import tile_image

        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [
            tile_image(
                load_image(img, max_pixels=self.max_pixels),
                max_tiles=self.max_tiles,
                tile_size=self.info.image_size,
                use_thumbnail=self.info.use_thumbnail,
                min_tiles=self.info.min_tiles,
            )
            for img in images
        ]

    def prepare(
        self,
        question: str,
        responses: Sequence[str | Sequence[str]],
        images: Any = None,
        *,
        max_steps: int | None = 12,
    ) -> PreparedGroup:
        steps: list[list[str] | RowError] = []
        for r in responses:
            try:
                steps.append(candidate_steps(r, max_steps))
            except RowError as exc:
                steps.append(exc)
        return prepare_group(
            question,
            steps,
            self.tile(images),
            self.tokenizer,
            system_message=self.system_message,
            image_tokens_per_tile=self.info.image_tokens_per_tile,
            image_token_id=self.info.image_token_id,
            max_context=self.info.max_context,
            context_policy=self.context_policy,
        )

    def score(
        self,
        question: str,
        responses: Sequence[str | Sequence[str]],
        images: Any = None,
        max_steps: int | None = 12,
        *,
        on_error: Literal["raise", "record"] = "raise",
    ) -> list[ScoredResponse]:
        """Score every response to ``question``; results come back in input order.

        A response is a string (split into steps as VisualPRM does) or a list of step strings
        (scored as given). ``images`` takes a PIL image, encoded bytes or a path/URI, or a list.
        With ``on_error="record"`` a response that cannot be scored comes back with ``error`` set
        instead of raising.
        """
        group = self.prepare(question, responses, images, max_steps=max_steps)
        if on_error == "raise":
            for err in group.errors:
                if err is not None:
                    raise err
        scores = self.scorer.score([group])[0]
        return [
            _result(r, steps, s, e, cut)
            for r, steps, s, e, cut in zip(
                responses, group.steps, scores, group.errors, group.truncated, strict=True
            )
        ]

    def select_best(
        self,
        question: str,
        responses: Sequence[str | Sequence[str]],
        images: Any = None,
        max_steps: int | None = 12,
    ) -> list[tuple[str | Sequence[str], float]]:
        """``[(response, score), ...]`` best first; ties keep input order (a stable sort)."""
        results = self.score(question, responses, images, max_steps)
        order = sorted(range(len(results)), key=lambda i: -results[i].score)
        return [(responses[i], results[i].score) for i in order]


def _result(
    response, steps, scores: np.ndarray | None, error: RowError | None, truncated: bool = False
) -> ScoredResponse:
    if scores is None:
        if error is None:
            raise AssertionError("a candidate with neither scores nor an error")  # a bug of ours
        return ScoredResponse(response, steps, [], None, error=str(error), error_kind=error.kind)
    values = [float(x) for x in scores]
    return ScoredResponse(
        response,
        steps,
        values,
        float(np.mean(scores, dtype=np.float64)) if values else math.nan,
        score_min=min(values),
        score_last=values[-1],
        truncated=truncated,
    )


def resolve_model_source(
    source: str | Path, *, storage: StorageOptions | None = None, cache_dir: str | None = None
) -> Path:
    """A local directory for a model source: a directory as is, an object-store prefix downloaded
    once per node into the cache, otherwise a hub id (where a hub is reachable)."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if "://" in text:
        from visualprm_ray.storage import local_model_dir

        return local_model_dir(text, storage, cache_dir)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    )
