"""zmqdisagg: run the target LLM as a server and stream its hidden states to draft trainers.

Importing this package imports neither cupy, NCCL, CUDA code nor transformers; those load when a
transport or a model that needs them is chosen.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
