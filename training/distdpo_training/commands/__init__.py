"""The `distdpo` subcommands of the offline pipeline: a table that distdpo_ros.cli merges.

Each module exposes `add_arguments(parser)` and `run(args) -> int` and is imported only when its
command runs (this file imports nothing heavy, so `distdpo --help` stays instant).
"""

_M = 'distdpo_training.commands.'

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    'simulate': (_M + 'simulate', 'simulate HDL-64E drives in the SemanticKITTI layout (+ bags)'),
    'build-maps': (_M + 'build_maps', 'build the per-sequence static ground-truth maps'),
    'kitti2bag': (_M + 'kitti2bag', 'write a SemanticKITTI sequence as a rosbag2 (MCAP/sqlite3)'),
    'bag2kitti': (_M + 'bag2kitti', 'turn a recorded rosbag2 into the SemanticKITTI layout'),
    'evaluate': (_M + 'evaluate', 'evaluate models on a dataset split: tables, plots, renders'),
    'render': (_M + 'render', 'draw a Fig.-1-style picture: scan, GT, teacher, student'),
    'replay': (_M + 'replay', 'replay a bag through the completion node over DDS (pip-only)'),
    'demo': (_M + 'demo', 'the out-of-the-box demo on the shipped default model'),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    'bench': {
        'metrics': (_M + 'bench_metrics', 'metric speed and memory against the reference'),
        'data': (_M + 'bench_data', 'simulator and build-maps speed'),
    },
    'train': {
        'teacher': (_M + 'train_teacher', 'train the LiDiff teacher (diffusion objective)'),
        'refine': (_M + 'train_refine', 'train the x6 refinement / up-sampling net'),
        'diffusion-dpo': (_M + 'train_diffusion_dpo', 'fine-tune a teacher with Diffusion-DPO'),
        'distill': (_M + 'train_distill', 'distill a few-step student with Distillation-DPO'),
        'score-distill': (_M + 'train_score_distill', 'score distillation baseline (no pairs)'),
    },
    'ablate': {
        'distill': (_M + 'ablate_distill', 'run the paper\'s distillation ablations, one table'),
    },
}
