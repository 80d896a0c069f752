"""What every attention layout shares: the model handles, vision forwards, image embedding, P(+).

A layout (:mod:`.packed`, :mod:`.prefix_cache`, :mod:`.shared_prefix`) only decides how a group's
prefix and candidate suffixes go through the language model. Everything around that lives here,
once: encoding tiles (several small groups' tiles through one vision forward), placing image
features at the image-context tokens, the '+'/'-' head in float32, scoring each distinct suffix
once, and, for the two layouts that run the prefix on its own first (:class:`PrefixFirstScorer`),
the prefix forward, the token-budget chunks and the gathering of the score rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from visualprm_ray.model.group import PreparedGroup
from visualprm_ray.model.scoring.options import KernelOptions

if TYPE_CHECKING:
    import torch

    from visualprm_ray.model.checkpoint import LoadedCheckpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_VISION_BATCH = 16

# Per group, per candidate: its step scores, or None for a candidate with an error.
Scores = list[list[np.ndarray | None]]


def normalize_tiles(tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NHWC tiles to normalised NCHW pixels: x/255, ImageNet mean/std in float32, then dtype."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device).view(1, 3, 1, 1)
    pixels = tiles.permute(0, 3, 1, 2).float().div_(255.0)
    return ((pixels - mean) / std).to(dtype)


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


def copy_duplicates(groups: Sequence[PreparedGroup], results: Scores) -> Scores:
    """Duplicates were scored once (see :func:`unique_candidates`); give every copy the result."""
    for g, group in enumerate(groups):
        first = unique_candidates(group)
        for k in range(group.num_candidates):
            if group.scorable(k):
                results[g][k] = results[g][first[group.suffixes[k].tobytes()]]
    return results


def torch_softmax_first(logits) -> np.ndarray:
    """P(+) = softmax over the two logits [z_plus, z_minus], first entry, as float32 numpy."""
    import torch

    return torch.softmax(logits, dim=-1)[:, 0].cpu().numpy().astype(np.float32)


class LayoutScorer:
    """Scores prepared groups on one device with one model replica; a subclass is one layout.

    Build one with :func:`visualprm_ray.model.scoring.make_scorer`, which picks the layout.
    """

    mode: str  # the layout's name, as in ``PrefixMode``

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        vision_batch: int = DEFAULT_VISION_BATCH,
        sdpa_kernels: Literal["default", "no_cudnn"] = "no_cudnn",
        options: KernelOptions | None = None,
    ) -> None:
        import inspect

        import torch

        from visualprm_ray.model.scoring import leaves

        self.model = checkpoint.model
        self.sdpa_kernels = sdpa_kernels
        self.options = options or KernelOptions()
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
        # transformers renamed the forward's cache argument (past_key_values -> cache) within 5.x.
        params = inspect.signature(self._language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._rotary_limit = None
        if self.options.rotary == "static":
            leaves.check_static_rotary(self._language_model, self.info.max_context)
            self._rotary_limit = leaves.static_rotary_limit(self._language_model)

    def score(self, groups: Sequence[PreparedGroup]) -> Scores:
        """Step scores per group, per candidate (None for candidates with an error)."""
        import torch

        from visualprm_ray.model.scoring import leaves

        results: Scores = [[None] * g.num_candidates for g in groups]
        with (
            torch.inference_mode(),
            self._attention_kernels(),
            leaves.patched(self._language_model, self.options),
        ):
            self._score_into(groups, results)
        return copy_duplicates(groups, results)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device. With ``host_syncs="avoid"`` on CUDA, through pinned
        memory without waiting: a plain copy from pageable memory waits for the device's queue."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.options.host_syncs == "avoid" and self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _check_positions(self, largest: int) -> None:
        """With ``rotary="static"``, every forward's positions stay below the scaling threshold."""
        if self._rotary_limit is not None and largest >= self._rotary_limit:
            raise AssertionError(
                f"position {largest} reached the dynamic rotary threshold {self._rotary_limit} with rotary='static'"
            )

    def _score_into(self, groups: Sequence[PreparedGroup], results: Scores) -> None:
        """Fill ``results[g][k]`` for the first copy of every distinct scorable suffix."""
        raise NotImplementedError

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

    def features_by_window(self, groups: Sequence[PreparedGroup]) -> Iterator[torch.Tensor | None]:
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

    # -- language model -------------------------------------------------------------------------

    def _embed_with_images(self, ids: np.ndarray, features: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of host token ids ``[rows, length]``, image features at the image tokens."""
        expected = 0 if features is None else features.shape[0]
        if self.options.host_syncs == "avoid":
            count = int(np.count_nonzero(ids == self.info.image_token_id))  # on the host: no read-back
            ids_on_device = self._to_device(ids)
            image_mask = ids_on_device == self.info.image_token_id
        else:
            ids_on_device = self._to_device(ids)
            image_mask = ids_on_device == self.info.image_token_id
            count = int(image_mask.sum())
        if count != expected:
            raise AssertionError(f"{count} image tokens for {expected} features")
        embeds = self._embed(ids_on_device)
        if count:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    def _p_plus(self, hidden: torch.Tensor) -> np.ndarray:
        logits = hidden.float() @ self._pm_head.T  # [N, 2]: z_plus, z_minus
        return torch_softmax_first(logits)


class PrefixFirstScorer(LayoutScorer):
    """Layouts that run each group's prefix once on its own, then its candidates against its K/V.

    Attention never spans two candidates, and a long group never recomputes its prefix. A
    subclass says how a chunk of candidates goes through the model (:meth:`_chunk_forward`) and
    how its chunks are counted against the budget (:attr:`packed_chunks`).
    """

    # True: a chunk's candidates sit end to end in one row (the budget counts real tokens);
    # False: one right-padded row per candidate (the budget counts rows x longest).
    packed_chunks: bool = False

    def __init__(self, checkpoint: LoadedCheckpoint, **kwargs: Any) -> None:
        super().__init__(checkpoint, **kwargs)
        # The chunk forwards pass their own masks (or none) to SDPA-shaped attention functions.
        if self.model.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"{self.mode} mode needs sdpa or eager attention")

    def _score_into(self, groups: Sequence[PreparedGroup], results: Scores) -> None:
        for g, (group, features) in enumerate(zip(groups, self.features_by_window(groups), strict=True)):
            for k, s in self._score_group(group, features).items():
                results[g][k] = s

    def _chunk_forward(
        self, group: PreparedGroup, chunk: list[int], lengths: list[int], p: int, prefix_kv: list
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Suffix hidden states of a chunk and where each candidate's tokens start in them."""
        raise NotImplementedError

    def _score_group(self, group: PreparedGroup, features: torch.Tensor | None) -> dict[int, np.ndarray]:
        import torch
        from transformers import DynamicCache

        candidates = list(unique_candidates(group).values())
        if not candidates:
            return {}
        p = len(group.prefix)
        self._check_positions(p + max(len(group.suffixes[k]) for k in candidates) - 1)
        cache = DynamicCache()
        out = self._language_model(
            inputs_embeds=self._embed_with_images(group.prefix[None, :], features),
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
        for chunk in chunks_by_budget(candidates, group, self.token_budget, packed=self.packed_chunks):
            lengths = [len(group.suffixes[k]) for k in chunk]
            suffix_hidden, starts = None, np.zeros(len(chunk), dtype=np.int64)
            if max(lengths):
                suffix_hidden, starts = self._chunk_forward(group, chunk, lengths, p, prefix_kv)
            positions = [group.positions[k] for k in chunk]
            probs = self._p_plus(
                score_rows(prefix_hidden, suffix_hidden, positions, starts, p, self._to_device)
            )
            for k, part in zip(
                chunk, np.split(probs, np.cumsum([len(x) for x in positions])[:-1]), strict=True
            ):
                results[k] = part
        return results


def chunks_by_budget(
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


def score_rows(
    prefix_hidden: torch.Tensor,
    suffix_hidden: torch.Tensor | None,
    positions: list[np.ndarray],
    starts: np.ndarray,
    p: int,
    to_device=None,
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
        values = np.ascontiguousarray(values, dtype=np.int64)
        return to_device(values) if to_device else torch.from_numpy(values).to(device)

    rows = np.nonzero(in_prefix)[0]
    out[index(rows)] = prefix_hidden[index(pos[rows])]
    rows = np.nonzero(~in_prefix)[0]
    if len(rows):
        owner = np.repeat(starts, [len(x) for x in positions])
        out[index(rows)] = suffix_hidden[index(owner[rows] + pos[rows] - p)]
    return out
