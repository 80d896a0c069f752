"""The PRM itself, with no Ray in it: everything :class:`~visualprm_ray.model.prm.VisualPRM` needs.

In the order a group goes through it:

- ``images``: bytes / paths / URIs / PIL to images, limits checked before decoding;
- ``tiling``: dynamic tiling to uint8 tiles, pixel-identical to upstream;
- ``prompt``: step splitting and the exact conversation text that is scored;
- ``tokenizer``: InternLM2's slow-tokenizer behaviour over sentencepiece; score positions;
- ``group``: a group of candidates tokenized and split into shared prefix + suffixes;
- ``checkpoint`` (+ ``tiny_checkpoint``): upstream -> transformers' native InternVL, strict loading;
- ``scoring/``: the fast scorer, one file per attention layout;
- ``reference``: the slow one-forward-per-candidate scorer the fast path is tested against;
- ``prm``: :class:`VisualPRM`, the Python API over all of it.

Nothing here imports Ray or :mod:`visualprm_ray.job` (a test keeps it so): the batch job and any
other driver use the model, never the other way round.
"""
