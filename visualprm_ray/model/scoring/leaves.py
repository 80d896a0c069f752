"""Leaf functions of the language model swapped in for one scoring call, and put back after.

Two options of :class:`~visualprm_ray.model.scoring.options.KernelOptions` act on the model
itself rather than on a layout:

- ``leaf_ops="compiled"``: every RMSNorm, SwiGLU product and rotary rotation of the language model
  goes through a small compiled function (``torch.compile(dynamic=True)``, one graph per function
  for every layer and length). Eagerly each is several memory-bound kernels with float32
  intermediates written out; compiled, one pass. The functions are this project's own, from the
  definitions (RMSNorm: x / rms(x) in float32, then the weight in the input dtype; SwiGLU:
  silu(gate) * up; rotary: x cos + rotate_half(x) sin).
- ``rotary="static"``: the rotary embedding without transformers' dynamic-scaling wrapper, which
  reads ``max(position_ids)`` back from the device on every forward to decide whether to rescale.
  Below the threshold it never rescales, so the undecorated function gives the same tables; the
  scorer refuses the option for a context that can reach the threshold
  (:func:`check_static_rotary`) and checks every forward's largest position on the host.

:func:`patched` swaps them in for one ``score`` call: the model is left as it was, so other
scorers of the same model (and the naive reference) see the plain transformers model.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from collections.abc import Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

from visualprm_ray.model.scoring.options import KernelOptions

if TYPE_CHECKING:
    import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import torch

    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated by their positions' angles (``cos``/``sin`` broadcast over heads)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@cache
def compiled(name: str) -> Callable[..., Any]:
    """One compiled version per process of :func:`rms_norm`, :func:`silu_mul` or :func:`rotate`."""
    import torch

    return torch.compile({"rms_norm": rms_norm, "silu_mul": silu_mul, "rotate": rotate}[name], dynamic=True)


def static_rotary_limit(language_model: Any) -> int | None:
    """Positions below which the rotary embedding never rescales; None if it is not dynamic."""
    rotary = language_model.rotary_emb
    if "dynamic" not in str(getattr(rotary, "rope_type", "")):
        return None
    return int(rotary.original_max_seq_len)


def check_static_rotary(language_model: Any, max_context: int) -> None:
    """Refuse ``rotary="static"`` where a conversation could reach the dynamic-scaling threshold."""
    limit = static_rotary_limit(language_model)
    if limit is not None and max_context > limit:
        raise ValueError(
            f"rotary='static' needs every position below {limit}, where dynamic rotary scaling starts, "
            f"and this model's context is {max_context} tokens: above {limit} the prefix and the "
            "candidates' keys would be rotated differently. Use rotary='dynamic' or a max_context "
            f"of at most {limit}."
        )


@contextlib.contextmanager
def patched(language_model: Any, options: KernelOptions) -> Iterator[None]:
    """The options' leaf functions in place on ``language_model`` for the block, then restored."""
    undo: list[Callable[[], None]] = []

    def set_forward(module: Any, forward: Callable[..., Any]) -> None:
        had = "forward" in vars(module)
        before = vars(module).get("forward")
        module.forward = forward
        undo.append(lambda: setattr(module, "forward", before) if had else delattr(module, "forward"))

    try:
        if options.rotary == "static" and static_rotary_limit(language_model) is not None:
            rotary = language_model.rotary_emb
            # A table grown past the threshold by an earlier long forward (not this scorer's) is
            # left to the dynamic check, which resets it.
            if rotary.max_seq_len_cached == rotary.original_max_seq_len:
                # The undecorated forward: transformers wraps it in its dynamic-scaling check.
                set_forward(rotary, types.MethodType(inspect.unwrap(type(rotary).forward), rotary))
        if options.leaf_ops == "compiled":
            _compile_leaves(language_model, set_forward, undo)
        yield
    finally:
        for step in reversed(undo):
            step()


def _compile_leaves(language_model: Any, set_forward, undo: list) -> None:
    norm, mul = compiled("rms_norm"), compiled("silu_mul")
    if getattr(language_model.config, "hidden_act", None) != "silu":
        raise ValueError(
            f"leaf_ops='compiled' implements SwiGLU with silu, not {language_model.config.hidden_act!r}"
        )
    for module in language_model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            set_forward(module, lambda x, m=module: norm(x, m.weight, m.variance_epsilon))
        elif hasattr(module, "gate_proj") and hasattr(module, "up_proj") and hasattr(module, "down_proj"):
            set_forward(module, lambda x, m=module: m.down_proj(mul(m.gate_proj(x), m.up_proj(x))))
    # The attention modules call the rotary rotation by its module-level name.
    layer = language_model.layers[0].self_attn
    home = importlib.import_module(type(layer).__module__)
    if hasattr(home, "apply_rotary_pos_emb"):
        before = home.apply_rotary_pos_emb
        home.apply_rotary_pos_emb = compiled("rotate")
        undo.append(lambda: setattr(home, "apply_rotary_pos_emb", before))
