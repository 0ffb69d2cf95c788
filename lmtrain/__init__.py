"""lmtrain: train small causal language models end to end.

The package is the library; ``lmtrain.cli`` is a thin command line over it. Importing
``lmtrain`` is cheap: torch, datasets and tensorboard are imported by the functions that need
them, never at module import time.
"""

__version__ = "0.1.0"

from lmtrain.errors import LmtrainError  # noqa: E402,F401
