"""Native helpers that move bytes: the CUDA copy kernels (``_C``, optional) and their torch fallback.

Import cost is nil on CPU: ``_C`` is probed once, lazily, by ``pack.HAS_NATIVE``; nothing here imports
cupy or CUDA at package import.
"""
