"""The `distdpo` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only maps names to modules, imported lazily so that `distdpo --help` is instant and the
vehicle runtime never imports the offline pipeline. Bad input raises UserError: one line on
stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distdpo_ros import __version__
from distdpo_ros.errors import UserError

_RT = 'distdpo_ros.commands.'
_TR = 'distdpo_training.commands.'

# name -> (module, one-line help). Groups ("bench", "train", "ablate") take a second word.
COMMANDS: dict[str, tuple[str, str]] = {
    'complete': (_RT + 'complete', 'complete a scan file (.bin .ply .pcd .npy), dense cloud out'),
    'import-ckpt': (_RT + 'import_ckpt', 'convert a LiDiff / Distillation-DPO .ckpt to ours'),
    'simulate': (_TR + 'simulate', 'simulate HDL-64E drives in the SemanticKITTI layout (+ bags)'),
    'build-maps': (_TR + 'build_maps', 'build the per-sequence static ground-truth maps'),
    'kitti2bag': (_TR + 'kitti2bag', 'write a SemanticKITTI sequence as a rosbag2 (MCAP/sqlite3)'),
    'bag2kitti': (_TR + 'bag2kitti', 'turn a recorded rosbag2 into the SemanticKITTI layout'),
    'evaluate': (_TR + 'evaluate', 'evaluate models on a dataset split: tables, plots, renders'),
    'render': (_TR + 'render', 'draw a Fig.-1-style picture: scan, GT, teacher, student'),
    'replay': (_TR + 'replay', 'replay a bag through the completion node over DDS (pip-only)'),
    'demo': (_TR + 'demo', 'the out-of-the-box demo on the shipped default model'),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    'bench': {
        'backbone': (_RT + 'bench_backbone', 'forward time of the sparse backbone'),
        'sampling': (_RT + 'bench_sampling', 'completion time at 1/2/4/8/50 steps'),
        'pointcloud': (_RT + 'bench_pointcloud', 'PointCloud2 <-> numpy conversion speed'),
        'metrics': (_TR + 'bench_metrics', 'metric speed and memory against the reference'),
        'data': (_TR + 'bench_data', 'simulator and build-maps speed'),
    },
    'train': {
        'teacher': (_TR + 'train_teacher', 'train the LiDiff teacher (diffusion objective)'),
        'refine': (_TR + 'train_refine', 'train the x6 refinement / up-sampling net'),
        'diffusion-dpo': (_TR + 'train_diffusion_dpo', 'fine-tune a teacher with Diffusion-DPO'),
        'distill': (_TR + 'train_distill', 'distill a few-step student with Distillation-DPO'),
        'score-distill': (_TR + 'train_score_distill', 'score distillation baseline (no pairs)'),
    },
    'ablate': {
        'distill': (_TR + 'ablate_distill', 'run the paper\'s distillation ablations, one table'),
    },
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f'  {name:<14}{text}' for name, (_, text) in COMMANDS.items()]
    for group, subs in GROUPS.items():
        lines += [f'  {group + " " + name:<14}{text}' for name, (_, text) in subs.items()]
    parser = argparse.ArgumentParser(
        prog='distdpo', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Few-step diffusion LiDAR scene completion (Distillation-DPO).',
        epilog='commands:\n' + '\n'.join(lines) + '\n\n`distdpo COMMAND --help` explains one.')
    parser.add_argument('--version', action='version', version=f'distdpo {__version__}')
    parser.add_argument('command', nargs='?', help='one of the commands below')
    return parser


def _resolve(argv: list[str]) -> tuple[str, str, str, list[str]]:
    """Return (prog name, module, help, remaining argv) or raise UserError for unknown names."""
    name = argv[0]
    if name in COMMANDS:
        module, text = COMMANDS[name]
        return name, module, text, argv[1:]
    if name in GROUPS:
        subs = GROUPS[name]
        if len(argv) < 2 or argv[1] not in subs:
            raise UserError(f'`distdpo {name}` needs one of: {", ".join(subs)}')
        module, text = subs[argv[1]]
        return f'{name} {argv[1]}', module, text, argv[2:]
    raise UserError(f'unknown command {name!r}; `distdpo --help` lists them')


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distdpo` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0].startswith('-'):
            _top_parser().parse_args(argv)
            _top_parser().print_help()
            return 0
        name, module_name, text, rest = _resolve(argv)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UserError(f'`distdpo {name}` needs the missing Python module {exc.name!r}; '
                            'install the extras: pip install -e ".[train]"') from exc
        parser = argparse.ArgumentParser(prog=f'distdpo {name}', description=text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f'distdpo: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('distdpo: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
