"""The `distdpo` subcommands of the vehicle runtime: a table that distdpo_ros.cli merges.

Each module exposes `add_arguments(parser)` and `run(args) -> int` and is imported only when its
command runs. Groups ("bench") take a second word; other packages add to the same groups.
"""

_M = 'distdpo_ros.commands.'

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    'complete': (_M + 'complete', 'complete a scan file (.bin .ply .pcd .npy), dense cloud out'),
    'import-ckpt': (_M + 'import_ckpt', 'convert a LiDiff / Distillation-DPO .ckpt to ours'),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    'bench': {
        'backbone': (_M + 'bench_backbone', 'forward time of the sparse backbone'),
        'sampling': (_M + 'bench_sampling', 'completion time at 1/2/4/8/50 steps'),
        'pointcloud': (_M + 'bench_pointcloud', 'PointCloud2 <-> numpy conversion speed'),
        'device': (_M + 'bench_device', 'the CUDA path in one run: CPU/CUDA accuracy, full-scale '
                   'completion, node latency, training step, GPU memory (JSON)'),
    },
}
