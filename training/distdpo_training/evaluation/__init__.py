"""Evaluation: completing scans of a dataset split, scoring them, tables, plots and pictures.

:mod:`.runs` plans the (model, steps) runs and the scans, :mod:`.scoring` completes and scores
them with a resumable per-scan cache, :mod:`.reports` writes tables and plots, :mod:`.evaluate`
puts them together; :mod:`.render` draws Fig.-1-style pictures; :mod:`.ablate` runs the paper's
distillation ablations.
"""
