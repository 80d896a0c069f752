"""The slow, obvious scorer: one full forward per candidate, image re-encoded each time.

This is what upstream's release does (one response at a time, unbatched). It is kept as the
yardstick that the fast path in :mod:`visualprm_ray.model.prm` is tested and benchmarked against,
so it deliberately shares nothing with it beyond the prompt and tokenizer: the model's own
``forward`` places the image features and builds the causal mask, and the full vocabulary logits
are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visualprm_ray.model.prompt import build_conversation
from visualprm_ray.model.tokenizer import find_score_positions

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def naive_step_scores(
    checkpoint,
    question: str,
    steps: Sequence[str],
    tiles_per_image: Sequence[np.ndarray],
    *,
    system_message: str | None = None,
) -> np.ndarray:
    """P(+) per step of one candidate, from a full forward of its whole conversation."""
    import torch

    model, tokenizer, info = checkpoint.model, checkpoint.tokenizer, checkpoint.info
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    text = build_conversation(
        question,
        steps,
        [len(t) for t in tiles_per_image],
        info.system_message if system_message is None else system_message,
        info.image_tokens_per_tile,
    )
    ids = tokenizer.encode(text)
    positions = find_score_positions(ids, tokenizer, len(steps))
    kwargs = {}
    if tiles_per_image:
        tiles = torch.from_numpy(np.concatenate(tiles_per_image)).to(device)
        pixels = tiles.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)
        kwargs["pixel_values"] = ((pixels - mean) / std).to(dtype)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device), **kwargs).logits[0]
    pair = logits[torch.from_numpy(positions).to(device)][:, [tokenizer.plus_id, tokenizer.minus_id]]
    return torch.softmax(pair.float(), dim=-1)[:, 0].cpu().numpy()
