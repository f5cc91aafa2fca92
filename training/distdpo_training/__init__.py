"""distdpo_training: the offline half of distdpo_ros (never needed on the vehicle).

Rooms, by what a newcomer looks for:

- :mod:`distdpo_training.data`: frames and their sources (the :class:`~.data.frames.FrameSource`
  interface a new dataset format implements; SemanticKITTI and rosbag2 readers), ground-truth
  maps, the training dataset, the drive simulator;
- :mod:`distdpo_training.engine`: the training engine every loop runs on (DDP, logs, resume);
- :mod:`distdpo_training.loops`: the training loops (teacher, refinement, Diffusion-DPO,
  Distillation-DPO / score distillation) and their shared toolkit :mod:`~.loops.common`;
- :mod:`distdpo_training.evaluation`: evaluation runs, tables, plots, renders and ablations;
- :mod:`distdpo_training.ros`: bag replay through the ROS 2 node and the demo;
- :mod:`distdpo_training.commands`: the `distdpo` subcommands this package owns.

Configurations live in ``configs/`` inside the package (installed with it); the recipe scripts in
``training/recipes/`` beside it.
"""
