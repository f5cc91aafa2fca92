"""The paper's distillation ablations at small scale, from one teacher and one seed, in one table.

Every variant is a distillation run (what `distdpo train distill` / `score-distill` run) with a
few config overrides, written to OUT/runs/NAME and evaluated (as `distdpo evaluate` does) into
OUT/eval/NAME; the teacher is
evaluated once at 8 and 50 steps. Both stages are resumable: a finished run or a scored scan is
never recomputed, an interrupted run continues from its last training state. The tables go to
OUT/ablation.md (and every row to OUT/ablation.json):

  Table 2  steps 1/2/4/8 of the main student          Table 5  CD vs JSD preference
  Table 3  lambda 1.05/1.1/1.2/1.5/2.0                 Table 6  score distillation vs DPO
  Signs    paper vs reversed vs released (the reference code's zero-gradient student)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distdpo_ros.atomic import atomic_writer
from distdpo_ros.completion import resolve_device
from distdpo_ros.errors import UserError
from distdpo_training.engine import read_log
from distdpo_training.evaluation.evaluate import Settings, plan_evaluation, run_evaluation
from distdpo_training.loops.distill import run_distillation


@dataclass(frozen=True)
class Variant:
    """One distillation run: a name, its config overrides and the method."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    method: str = 'dpo'  # 'dpo' (Distillation-DPO) or 'score' (score distillation)
    tables: tuple[str, ...] = field(default=())


MAIN = 'dpo'
VARIANTS: tuple[Variant, ...] = (
    Variant(MAIN, 'Distillation-DPO (lambda 1.1, CD, paper sign)', (),
            tables=('lambda', 'metric', 'method', 'sign')),
    *(Variant(f'lambda_{lam}', f'lambda = {lam}', (f'pair_noise_scale={lam}',),
              tables=('lambda',)) for lam in ('1.05', '1.2', '1.5', '2.0')),
    Variant('jsd', 'Distillation-DPO (JSD preference)', ('preference_metric=jsd',),
            tables=('metric',)),
    Variant('score', 'Score distillation', (), method='score', tables=('method',)),
    Variant('reversed', 'Distillation-DPO (reversed sign)', ('sign=reversed',),
            tables=('sign',)),
    Variant('released', 'Released code (zero student gradient)', ('sign=released',),
            tables=('sign',)),
)
TABLES = (
    ('steps', 'Table 2: sampling steps of the Distillation-DPO student'),
    ('lambda', 'Table 3: initial-noise scale lambda of the second sample'),
    ('metric', 'Table 5: metric that picks the winner'),
    ('method', 'Table 6: score distillation vs Distillation-DPO'),
    ('sign', 'Sign of the student update (Eq. 18)'),
)


def select(names: str | None) -> list[Variant]:
    """The variants named in a comma-separated list (all by default); the main one always."""
    if not names:
        return list(VARIANTS)
    wanted = {n.strip() for n in names.split(',') if n.strip()}
    known = {v.name for v in VARIANTS}
    unknown = sorted(wanted - known)
    if unknown:
        raise UserError(f'--variants: unknown {unknown}; choose from {sorted(known)}')
    return [v for v in VARIANTS if v.name in wanted or v.name == MAIN]


def _finished(run: Path, max_steps: int) -> bool:
    log = run / 'log.jsonl'
    if not (run / 'model' / 'last' / 'config.json').is_file() or not log.is_file():
        return False
    records = read_log(log)
    return bool(records) and records[-1]['step'] >= max_steps


def train_variant(variant: Variant, args: Any) -> Path:
    """Train (or resume, or skip) one variant; returns its run folder."""
    run = args.out / 'runs' / variant.name
    if _finished(run, args.max_steps):
        print(f'ablate: {variant.name}: already trained', file=sys.stderr)
        return run
    options = argparse.Namespace(
        config=args.config, data=args.data, out=run, teacher=str(args.teacher),
        max_steps=args.max_steps, seed=args.seed, device=args.device,
        set=[*variant.overrides, *args.set],
        resume='last' if (run / 'state' / 'last.safetensors').is_file() else None)
    print(f'ablate: training {variant.name} ({variant.label})', file=sys.stderr)
    if run_distillation(options, variant.method) != 0:
        raise UserError(f'ablate: training variant {variant.name!r} failed (see {run})')
    return run


def evaluate(model: Path, name: str, steps: tuple[int, ...], args: Any,
             inputs: bool = False) -> list[dict[str, Any]]:
    """The evaluation rows of one model (cached per scan, so a rerun recomputes nothing),
    after the input baseline rows of the same scans when `inputs`."""
    evaluation = plan_evaluation(
        [(name, str(model), steps)], args.data, args.out / 'eval' / name,
        sequences=args.sequences.split(','), limit=args.limit or None, refine=args.refine,
        renders=args.renders, settings=Settings(seed=args.seed, emd_points=args.emd_points),
        baselines=inputs)
    evaluation.device = str(resolve_device(args.device))
    return run_evaluation(evaluation)


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return '-'
    return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


COLUMNS = (('NFE', 'nfe', 0), ('CD (m)', 'cd', 3), ('JSD', 'jsd', 3), ('EMD (m)', 'emd', 3),
           ('F (%)', 'fscore', 1), ('s/scan', 'seconds_per_scan', 2))


def markdown(tables: dict[str, list[dict[str, Any]]], teacher: list[dict[str, Any]],
             header: str) -> str:
    """The ablation tables; every table starts with the input baselines and the teacher rows
    for reference."""
    lines = [header, '']
    for key, title in TABLES:
        rows = tables.get(key)
        if not rows:
            continue
        lines += [f'### {title}', '', '| model | ' + ' | '.join(c for c, _, _ in COLUMNS) + ' |',
                  '|---|' + '---:|' * len(COLUMNS)]
        for row in [*teacher, *rows]:
            refined = ' (refined)' if row.get('refine') else ''
            cells = ['-' if row.get('baseline') and k in ('nfe', 'seconds_per_scan')
                     else _cell(row.get(k, float('nan')), d) for _, k, d in COLUMNS]
            lines.append(f'| {row["label"]}{refined} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def run_ablation(args: Any) -> Path:
    """Train and evaluate the selected variants; write OUT/ablation.md and OUT/ablation.json."""
    variants = select(args.variants)
    runs = {v.name: train_variant(v, args) for v in variants}
    teacher_rows = evaluate(args.teacher, 'teacher', (8, 50), args, inputs=True)
    for row in teacher_rows:  # the input baselines of the same scans, then the teacher
        row['label'] = row['model'] if row['baseline'] else f'teacher, {row["steps"]} steps'
    tables: dict[str, list[dict[str, Any]]] = {}
    every = list(teacher_rows)
    for v in variants:
        steps = (1, 2, 4, 8) if v.name == MAIN else (8,)
        rows = evaluate(runs[v.name] / 'model' / 'last', v.name, steps, args)
        for row in rows:
            row['label'] = v.label if v.name != MAIN else f'{v.label}, {row["steps"]} steps'
        every += rows
        at8 = [r for r in rows if r['steps'] == 8]
        for key in v.tables:
            tables.setdefault(key, []).extend(at8)
        if v.name == MAIN:
            tables['steps'] = rows
    header = (f'## Distillation ablations ({args.max_steps} steps each, seed {args.seed}, '
              f'teacher {args.teacher}, evaluated on sequences {args.sequences}'
              f'{f", {args.limit} scans" if args.limit else ""})')
    out = args.out / 'ablation.md'
    with atomic_writer(out) as handle:
        handle.write(markdown(tables, teacher_rows, header).encode())
    with atomic_writer(args.out / 'ablation.json') as handle:
        handle.write((json.dumps(every, indent=2, default=str) + '\n').encode())
    return out
