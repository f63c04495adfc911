"""Draft training (EAGLE3 and DFlash) against a local or remote target (``zmqdisagg-train``).

Modules, one job each: ``config`` (TrainConfig), ``data``/``batching`` (tokens, loss masks, batches),
``algorithm`` (the per-algorithm interface the loop calls), ``eagle3_draft``/``eagle3_loss`` (EAGLE3: the
network with TTT attention, its objective; ``vocab``: d2t/t2d), ``dflash_draft``/``dflash_loss`` (DFlash:
the block-diffusion network, anchors, blocks and its objective), ``prefetch`` (requests in flight),
``target_setup`` (local or remote target), ``distributed`` (DDP), ``optim``, ``checkpoint``, ``metrics``,
``export`` (the directories engines load), ``loop`` (the Trainer, shared by both algorithms), and the
demo aids ``demo_data`` and ``demo_target``. See docs/training.md.

Importing this package imports nothing heavy; ``loop`` pulls in torch and transformers.
"""
