"""Evaluate completion models on a dataset split: the paper's tables, plots and Fig.-1 pictures.

For every model, sampler step count and refinement setting (one *run*), every scan of the split is
completed with :class:`distdpo_ros.completion.Completer` and scored against its evaluation ground
truth with :func:`distdpo_ros.metrics.scan_metrics`. Each scan's result is written at once to a
small JSON file in ``OUT/cache/``, keyed by the model's weight digest, the run and the scan, so a
killed evaluation continues where it stopped and a repeated one recomputes nothing. Under
``torchrun`` the scans are sharded over the processes (RANK / WORLD_SIZE); rank 0 then merges the
cache into

- ``results.json`` (one row per run) and ``results.csv``;
- ``results.md``: the layout of the paper's Tables 1-2 (model, NFE, CD, JSD, EMD, P/R/F, IoU,
  seconds per scan), plus the legacy cropped IoU for comparison with published numbers;
- ``quality_vs_steps.png``, ``time_vs_steps.png`` and ``renders/*.png`` (Fig.-1 layout).

Timing: seconds per scan is the wall time of the completion (pre-processing, sampling,
post-processing, and for refined rows the refinement), after one untimed warm-up completion per
run and process (``--no-warmup`` skips it); metric computation is not included. Refined rows
reuse the unrefined sample of the same seed and add the refinement net's offsets, exactly what
``Completer.complete(..., refine=True)`` returns, so ``--refine`` costs one refinement pass, not
a second diffusion.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distdpo_ros.errors import UserError
from distdpo_training.evaluation.reports import (
    compare_with_inputs,
    write_plots,
    write_renders,
    write_results,
)
from distdpo_training.evaluation.runs import (
    Evaluation,
    KittiScans,
    ModelSpec,
    Run,
    Settings,
    make_runs,
    shard,
)
from distdpo_training.evaluation.scoring import CACHE_DIR, collect, evaluate_shard

__all__ = ['Evaluation', 'KittiScans', 'ModelSpec', 'Settings', 'finish', 'plan_evaluation',
           'run_evaluation']


def plan_evaluation(models: Sequence[tuple[str | None, str, tuple[int, ...] | None]],
                    data: Path, out: Path, *, split: str = 'val',
                    sequences: Sequence[str] | None = None, limit: int | None = None,
                    refine: bool = False, settings: Settings | None = None,
                    max_range: float | None = None, renders: int = 3, warmup: bool = True,
                    baselines: bool = True) -> Evaluation:
    """An :class:`Evaluation` of `models`, each (name or None, checkpoint, steps or None).

    A missing name is the checkpoint folder's name, missing steps are the model's own; the ground
    truth range defaults to the largest max_range of the models. With `baselines` the tables
    start with the input baselines of the same scans (:mod:`.baselines`). Raises UserError for
    models without refinement weights under `refine` and for repeated names.
    """
    from distdpo_ros.checkpoint import load_config, resolve_model

    specs, ranges = [], []
    for name, path, steps in models:
        config = load_config(path)
        if refine and not config.has_refine:
            raise UserError(f'{resolve_model(path)}: --refine given but this model has no '
                            'refinement weights')
        specs.append(ModelSpec(name or resolve_model(path).resolve().name, str(path),
                               steps or (config.steps,)))
        ranges.append(config.max_range)
    if len({spec.name for spec in specs}) < len(specs):
        raise UserError('the evaluated models need different names (--name, --teacher-name)')
    dataset = KittiScans(data, split, sequences, max_range=max_range or max(ranges))
    scans = dataset.scan_refs(limit)
    where = ', '.join(dataset.sequences)
    return Evaluation(
        models=specs, scans=scans, dataset=dataset, out=out, settings=settings or Settings(),
        refine=refine, renders=renders, warmup=warmup, baselines=baselines,
        description=f'{data.name} {"sequences" if sequences else split} ({where}), '
                    f'{len(scans)} scans')


def finish(ev: Evaluation, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Merge the cache into results, tables, plots and renders (rank 0 only)."""
    rows = collect(ev, runs)
    compare_with_inputs(rows)
    write_results(ev, rows)
    write_plots(ev, rows)
    write_renders(ev, runs)
    return rows


def run_evaluation(ev: Evaluation, rank: int = 0, world_size: int = 1,
                   barrier: Callable[[], None] = lambda: None) -> list[dict[str, Any]] | None:
    """Evaluate this rank's shard, wait for all ranks, and (rank 0) write the outputs."""
    runs = make_runs(ev.models, ev.refine, ev.baselines)
    label = 'evaluate' if world_size == 1 else f'evaluate rank {rank}'
    counts = evaluate_shard(ev, runs, shard(ev.scans, rank, world_size), progress_label=label)
    print(f'{label}: {counts["computed"]} results computed, {counts["cached"]} from the cache '
          f'in {ev.out / CACHE_DIR}', file=sys.stderr)
    barrier()
    if rank != 0:
        return None
    return finish(ev, runs)
