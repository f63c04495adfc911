"""EAGLE3 draft training against a local or remote target (``zmqdisagg-train``).

Modules, one job each: ``config`` (TrainConfig), ``data``/``batching`` (tokens, loss masks, batches),
``vocab`` (d2t/t2d), ``eagle3_draft`` (the network and TTT attention), ``eagle3_loss`` (alignment and
objective), ``prefetch`` (requests in flight), ``target_setup`` (local or remote target), ``distributed``
(DDP), ``optim``, ``checkpoint``, ``metrics``, ``export`` (SGLang/vLLM draft directory), ``loop``
(the Trainer), and the demo aids ``demo_data`` and ``demo_target``. See docs/training.md.

Importing this package imports nothing heavy; ``loop`` pulls in torch and transformers.
"""
