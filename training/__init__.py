"""distdpo_training: the offline pipeline (data, simulator, training loops, evaluation).

Installed as `distdpo_training` from the `training/` folder; never needed on the vehicle.
"""
