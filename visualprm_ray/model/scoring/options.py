"""The scorer's optional fast paths, one setting each, every one off by default.

Each option changes how the same numbers are computed, never which numbers: every value is
tested against the naive per-candidate forward (``tests/model/test_prm.py``) on CPU in float32,
and on a CUDA device under the ``gpu`` marker. None is on by default on CUDA until a GPU run has
measured it faster (``benchmarks/gpu_session.py``, docs/PERFORMANCE.md).

What each one removes, from a review of the CUDA path (issue 21; its figures are estimates):

- ``attention="varlen"`` (``shared_prefix`` only): the chunk's packed ``[tokens, heads, dim]``
  queries go straight into PyTorch's variable-length flash forward, twice: against the one prefix
  copy, and causally within each candidate (cumulative lengths). No padded copy of the queries,
  keys and values, no unpadding, and no repeat of the 8 key/value heads to the 32 query heads
  (flash reads grouped heads natively). Off CUDA (or in float32) each candidate runs through the
  same two-part attention one at a time, so its layout is tested on any machine.
- ``merge="compiled"`` (``shared_prefix`` only): the log-sum-exp merge of the two attention
  parts as one compiled kernel, float32 inside, output written in the ``[tokens, heads, dim]``
  layout the output projection reads; eagerly it is about a dozen kernels and copies per layer.
- ``leaf_ops="compiled"``: RMSNorm, the rotary rotation of queries/keys and SwiGLU's product,
  the memory-bound elementwise work between the matmuls, compiled (``torch.compile``,
  ``dynamic=True``) as small leaf functions. The attention is never compiled: its packing
  arguments change every group and would recompile.
- ``rotary="static"``: the language model's rotary table without transformers' dynamic-scaling
  checks, which read the largest position back from the device on every forward. Below the
  scaling threshold (32,768 positions for VisualPRM-8B) the tables are the same; above it the
  dynamic scaling would rotate the prefix and the suffix keys differently, so the scorer refuses
  this option when the model's context can reach past it, and checks every forward's positions.
- ``host_syncs="avoid"``: index tensors copied to the device from pinned memory without waiting,
  the image-token count checked on the host, and transformers spared its packed-sequence check
  (a device read-back) on the shared-prefix forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

Attention = Literal["padded", "varlen"]
Merge = Literal["eager", "compiled"]
LeafOps = Literal["eager", "compiled"]
Rotary = Literal["dynamic", "static"]
HostSyncs = Literal["default", "avoid"]

# Options that only the shared_prefix layout has (the others attend through transformers' SDPA).
SHARED_PREFIX_ONLY = {"attention": "padded", "merge": "eager"}
_CHOICES = {
    "attention": Attention,
    "merge": Merge,
    "leaf_ops": LeafOps,
    "rotary": Rotary,
    "host_syncs": HostSyncs,
}


@dataclass(frozen=True)
class KernelOptions:
    """How the scorer computes, beyond its layout; the defaults are the measured baseline."""

    attention: Attention = "padded"
    merge: Merge = "eager"
    leaf_ops: LeafOps = "eager"
    rotary: Rotary = "dynamic"
    host_syncs: HostSyncs = "default"

    def __post_init__(self) -> None:
        for f in fields(self):
            allowed = get_args(_CHOICES[f.name])
            if getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {allowed}, not {getattr(self, f.name)!r}")

    @property
    def needs_shared_prefix(self) -> bool:
        """Whether an option is set that only the shared_prefix layout implements."""
        return any(getattr(self, name) != off for name, off in SHARED_PREFIX_ONLY.items())

    @classmethod
    def parse(cls, text: str) -> KernelOptions:
        """``"attention=varlen,merge=compiled"`` (the benchmarks' notation); empty: the defaults."""
        values = dict(part.split("=", 1) for part in text.split(",") if part.strip())
        return cls(**{k.strip(): v.strip() for k, v in values.items()})

    def label(self) -> str:
        """The options that differ from the defaults, as :meth:`parse` reads them."""
        default = KernelOptions()
        return ",".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        )
