"""The training loops, one file each, on :mod:`distdpo_training.engine`.

:mod:`.common` holds what every loop shares (data and validation settings, learning-rate decay,
loading and exporting networks, validation completions); :mod:`.teacher`, :mod:`.refine`,
:mod:`.diffusion_dpo` and :mod:`.distill` (Distillation-DPO and score distillation) are the loops.
"""
