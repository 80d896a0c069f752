"""From scores to training data: ``visualprm-ray export`` (DPO pairs, best-of-N SFT sets, step labels).

A finished scores output and the input it was made from become a Hugging Face ``datasets``
Parquet dataset in the form TRL's trainers take, images included, in one Ray Data pass:
:mod:`~visualprm_ray.export.select` (which rows a group gives, or why none),
:mod:`~visualprm_ray.export.formats` (TRL's shapes and the ``datasets`` features),
:mod:`~visualprm_ray.export.sink` (the files and their counts), :mod:`~visualprm_ray.export.card`
(README.md and ``_export.json``), driven by :mod:`~visualprm_ray.export.driver`.
"""

from visualprm_ray.export.config import ExportConfig
from visualprm_ray.export.driver import ExportError, run_export

__all__ = ["ExportConfig", "ExportError", "run_export"]
