"""SemanticKITTI class ids used by the simulator, and the materials that shape each LiDAR return.

Class ids follow semantic-kitti.yaml (the `labels` table of the SemanticKITTI API): a `.label`
value is `class | instance << 16`. Moving objects use the moving classes (252-259), which the
ground-truth maps drop (they keep 1 < class < 252).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Static classes.
CAR, BICYCLE, TRUCK, OTHER_VEHICLE = 10, 11, 18, 20
PERSON, BICYCLIST = 30, 31
ROAD, SIDEWALK = 40, 48
BUILDING, FENCE = 50, 51
VEGETATION, TRUNK, TERRAIN = 70, 71, 72
POLE, TRAFFIC_SIGN = 80, 81

# Moving counterparts (semantic-kitti.yaml): 252 moving-car, 253 moving-bicyclist,
# 254 moving-person, 258 moving-truck, 259 moving-other-vehicle.
MOVING = {CAR: 252, BICYCLIST: 253, PERSON: 254, TRUCK: 258, OTHER_VEHICLE: 259}
FIRST_MOVING = 252


@dataclasses.dataclass(frozen=True)
class Material:
    """How a surface answers a laser pulse.

    `noise` is extra range noise (m, on top of the sensor's), `dropout` the chance that a return is
    lost, `depth` the mean of an exponential penetration (foliage: pulses end inside the crown),
    `windows` marks facades whose window panes are drawn from the hit position.
    """

    name: str
    noise: float = 0.0
    dropout: float = 0.0
    depth: float = 0.0
    windows: bool = False


MATERIALS: tuple[Material, ...] = (
    Material('asphalt'),
    Material('marking'),
    Material('concrete'),
    Material('grass', noise=0.02),
    Material('facade', windows=True),
    Material('wall'),
    Material('paint', dropout=0.02),
    Material('glass', dropout=0.12, noise=0.03, depth=0.4),
    Material('foliage', noise=0.03, dropout=0.02, depth=0.25),
    Material('bark', noise=0.01),
    Material('metal'),
    Material('retroreflector'),
    Material('cloth', noise=0.01),
    Material('roof'),
)
MATERIAL_ID = {m.name: i for i, m in enumerate(MATERIALS)}
ASPHALT, MARKING, CONCRETE, GRASS, FACADE, WALL, PAINT, GLASS, FOLIAGE, BARK, METAL, \
    RETRO, CLOTH, ROOF = range(len(MATERIALS))

# Per-material lookup tables, indexed by material id.
MAT_NOISE = np.array([m.noise for m in MATERIALS], np.float32)
MAT_DROPOUT = np.array([m.dropout for m in MATERIALS], np.float32)
MAT_DEPTH = np.array([m.depth for m in MATERIALS], np.float32)
MAT_WINDOWS = np.array([m.windows for m in MATERIALS], bool)
