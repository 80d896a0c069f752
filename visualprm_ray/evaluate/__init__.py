"""Evaluating the PRM: VisualProcessBench step F1 (:mod:`.vpb`, :mod:`.metrics`) and best-of-N (:mod:`.bon`).

Importing this package is free: the modules import numpy, pyarrow and the model only when used,
so ``visualprm-ray --help`` stays instant.
"""

from __future__ import annotations


class EvalInputError(ValueError):
    """The evaluation cannot start because of its inputs (a missing column, an unfinished run...).

    The command line turns it into a one-line message and exit status 2; anything else is a bug
    and keeps its traceback.
    """
