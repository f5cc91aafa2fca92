"""Model configuration: the numbers a checkpoint carries so that any command can use it unchanged.

A checkpoint directory holds `config.json` (this dataclass) and the weights as safetensors,
see :mod:`distdpo_ros.checkpoint`. `full` is the paper's scale (LiDiff/Distillation-DPO
weights), `small` is the CPU scale used for the shipped default model, `tiny` is for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from distdpo_ros.errors import UserError

SCALES = ('full', 'small', 'tiny')
ROLES = ('teacher', 'student', 'refine')
# The fields that decide whether two checkpoints have the same networks (weights transfer).
NETWORK_FIELDS = ('channel_ratio', 'resolution', 'scan_points', 'replication')


@dataclass
class ModelConfig:
    """Everything needed to rebuild the networks and run them as trained."""

    scale: str = 'full'
    role: str = 'teacher'
    channel_ratio: float = 1.0
    resolution: float = 0.05  # voxel size in metres used to quantise points for the networks
    scan_points: int = 18000  # M: points of the conditioning scan after farthest point sampling
    replication: int = 10  # K: the scan is tiled K times to make x_init (N = K * M points)
    min_range: float = 3.5  # metres, on xyz
    max_range: float = 50.0  # metres, on xyz; also the post-processing crop
    min_z: float = -4.0
    beta_start: float = 3.5e-5
    beta_end: float = 0.007
    num_train_timesteps: int = 1000
    steps: int = 50  # default sampler steps
    guidance: float = 6.0  # classifier-free guidance weight w: eps_u + w * (eps_c - eps_u)
    init_noise_scale: float = 1.0  # lambda in x_T = x_init + lambda * eps
    refine_up_factor: int = 6  # offsets per point of the refinement net (3 x 6 outputs)
    has_refine: bool = False  # whether the checkpoint carries refinement weights
    notes: dict[str, Any] = field(default_factory=dict)  # provenance: source, run, metrics

    @property
    def full_points(self) -> int:
        """N, the number of points diffused (scan points tiled K times)."""
        return self.scan_points * self.replication

    def validate(self) -> ModelConfig:
        """Raise UserError naming the first field that is out of range."""
        if self.scale not in SCALES:
            raise UserError(f'config field "scale" must be one of {SCALES}, got {self.scale!r}')
        if self.role not in ROLES:
            raise UserError(f'config field "role" must be one of {ROLES}, got {self.role!r}')
        positive = ('channel_ratio', 'resolution', 'scan_points', 'replication', 'max_range',
                    'num_train_timesteps', 'steps', 'init_noise_scale', 'refine_up_factor')
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f'config field "{name}" must be > 0, got {getattr(self, name)!r}')
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UserError('config fields "beta_start" < "beta_end" must lie in (0, 1)')
        if self.min_range >= self.max_range:
            raise UserError('config field "min_range" must be smaller than "max_range"')
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = 'config') -> ModelConfig:
        """Build from a dict, refusing unknown fields (a typo should not be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f'{source}: unknown config field(s) {unknown}')
        return cls(**data).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes).validate()


def require_same_networks(have: ModelConfig, want: ModelConfig, source: str,
                          fields: tuple[str, ...] = NETWORK_FIELDS) -> None:
    """Raise UserError naming `source` (what `have` was read from) and the differing fields.

    `fields` defaults to everything that shapes the diffusion networks; the refinement net only
    needs the voxel fields ('channel_ratio', 'resolution').
    """
    differ = [k for k in fields if getattr(have, k) != getattr(want, k)]
    if differ:
        raise UserError(f'{source} does not fit this run: fields {differ} differ ('
                        f'{[getattr(have, k) for k in differ]} there, '
                        f'{[getattr(want, k) for k in differ]} here)')


def preset(scale: str, role: str = 'teacher') -> ModelConfig:
    """The configuration of a named scale. `small` and `tiny` are chosen for CPUs (see README)."""
    guidance = 6.0 if role == 'teacher' else 3.5
    steps = 50 if role == 'teacher' else 8
    if scale == 'full':
        return ModelConfig(scale='full', role=role, guidance=guidance, steps=steps)
    if scale == 'small':
        # Measured on the 2-core dev CPU, one thread, CPU time (`distdpo bench backbone`): guided
        # forward (B = 2) 0.17-0.47 s by noise level, ~20 s for a 50-step teacher; training step
        # (B = 2, encoder + UNet, Adam) 1.1 s. Ratio 0.5: 2.4x slower; 2000 scan points: 1.6x;
        # 0.2 m voxels: 1.6x faster (coarser output).
        return ModelConfig(scale='small', role=role, channel_ratio=0.25, resolution=0.1,
                           scan_points=1000, replication=10, max_range=30.0,
                           guidance=guidance, steps=steps)
    if scale == 'tiny':
        return ModelConfig(scale='tiny', role=role, channel_ratio=0.125, resolution=0.2,
                           scan_points=200, replication=4, max_range=30.0,
                           guidance=guidance, steps=steps)
    raise UserError(f'unknown scale {scale!r}; choose one of {SCALES}')
