"""`mil extract moco`: MoCo v2 pretraining of a tile encoder, laid out as facebookresearch/moco.

* `builder`: the method, `MoCo` (query and key encoders, MLP head, queue).
* `augment`: the "aug+" views, batched.
* `data`: tiles straight from the slides, a seeded sample per slide.
* `train`: `run_moco`, the training run (DDP, checkpoints, resume, export).
* `cli`: the Typer command, also runnable with ``torchrun -m mil.extract.moco.cli``.
"""
