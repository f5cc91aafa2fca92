"""Model configuration: the numbers a checkpoint carries so that any command can use it unchanged.

A checkpoint directory holds `config.json` (this dataclass) and the weights as safetensors,
see :mod:`distdpo_ros.checkpoint`. `full` is the paper's scale (LiDiff/Distillation-DPO
weights), `small` is the CPU scale used for the shipped default model, `tiny` is for tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from distdpo_ros.errors import UserError

SCALES = ('full', 'small', 'tiny')
ROLES = ('teacher', 'student', 'refine')
# The fields of a scale (what a loop config states), and with the normalisation the fields that
# decide whether two checkpoints have the same networks (weights transfer).
SCALE_FIELDS = ('channel_ratio', 'resolution', 'scan_points', 'replication')
NETWORK_FIELDS = (*SCALE_FIELDS, 'norm')
# Samplers (distdpo_ros.diffusion.solvers.SOLVERS): LiDiff's variance-preserving DPM-Solver++ on
# the residual (the default: imported and older checkpoints behave exactly as before), its DDPM
# counterpart, and the two variance-exploding samplers consistent with the training noising.
SAMPLERS = ('dpm-solver++', 'ddpm', 've-ddim', 've-ancestral')
VE_SAMPLERS = ('ve-ddim', 've-ancestral')
NORMS = ('batch', 'group')


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
    # The formulation (issue 15). Defaults are LiDiff's, so a config.json without these fields
    # (published checkpoints, older models) loads and samples exactly as before.
    sampler: str = 'dpm-solver++'  # one of SAMPLERS
    t_start: int = -1  # first sampling timestep, start x_init + sigma_t_start * eps (ve-*);
    #                    -1: num_train_timesteps - 1 (LiDiff's samplers start there, x_init + eps)
    x0_clamp: float = 0.0  # metres (ve-*): keep each x_0 estimate this close to x_init; 0 = off
    norm: str = 'batch'  # 'batch': LiDiff's BatchNorm; 'group': per-item GroupNorm (no running
    #                      statistics, so train and eval mode compute the same function)
    notes: dict[str, Any] = field(default_factory=dict)  # provenance: source, run, metrics

    @property
    def start_timestep(self) -> int:
        """t_start with -1 resolved to the last training timestep."""
        return self.num_train_timesteps - 1 if self.t_start < 0 else self.t_start

    @property
    def full_points(self) -> int:
        """N, the number of points diffused (scan points tiled K times)."""
        return self.scan_points * self.replication

    def validate(self) -> ModelConfig:
        """Raise UserError naming the first field of the wrong type or out of range."""
        check_fields(self)  # each field against its rule in FIELD_RULES
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UserError('config fields "beta_start" < "beta_end" must lie in (0, 1)')
        if self.min_range >= self.max_range:
            raise UserError('config field "min_range" must be smaller than "max_range"')
        self._validate_formulation()
        return self

    def _validate_formulation(self) -> None:
        """The formulation's checks across fields (each field's own: FIELD_RULES)."""
        if self.t_start >= self.num_train_timesteps:
            raise UserError(f'config field "t_start" must be -1 or in [0, '
                            f'{self.num_train_timesteps - 1}], got {self.t_start!r}')
        last = self.num_train_timesteps - 1
        if self.sampler not in VE_SAMPLERS and (self.start_timestep != last or self.x0_clamp > 0):
            raise UserError(f'config fields "t_start" and "x0_clamp" need a variance-exploding '
                            f'sampler {VE_SAMPLERS}; sampler {self.sampler!r} starts at T and '
                            'does not clamp')
        if self.steps > self.start_timestep:
            raise UserError(f'config field "steps" ({self.steps}) must not exceed the start '
                            f'timestep ({self.start_timestep})')

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
    needs the voxel fields and its normalisation ('channel_ratio', 'resolution', 'norm').
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


# -------------------------------------------------------------------------------------------------
# Field rules: the type and range of every field, in one table (a new field adds one line)
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldRule:
    """What one config field may hold: a type and, for numbers, a range (and finite values);
    for strings, the allowed choices. `low_open` makes the lower bound exclusive."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why `value` does not fit this rule (None when it does)."""
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return f'must be a whole number, got {value!r}'
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return f'must be a number, got {value!r}'
            if not math.isfinite(value):
                return f'must be a finite number, got {value!r}'
        elif not isinstance(value, self.kind):
            return f'must be a {self.kind.__name__}, got {value!r}'
        if self.choices and value not in self.choices:
            return f'must be one of {self.choices}, got {value!r}'
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f'must be {">" if self.low_open else ">="} {_shown(self.low)}, got {value!r}'
        if self.high is not None and value > self.high:
            return f'must be <= {_shown(self.high)}, got {value!r}'
        return None


def _shown(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f'{bound:g}'



FIELD_RULES: dict[str, FieldRule] = {
    'scale': FieldRule(str, choices=SCALES),
    'role': FieldRule(str, choices=ROLES),
    'channel_ratio': FieldRule(float, 0, 8, low_open=True),
    'resolution': FieldRule(float, 1e-3, 10),  # metres
    'scan_points': FieldRule(int, 1, 1_000_000),
    'replication': FieldRule(int, 1, 100),
    'min_range': FieldRule(float, 0, 10_000),
    'max_range': FieldRule(float, 0, 10_000, low_open=True),
    'min_z': FieldRule(float, -10_000, 10_000),
    'beta_start': FieldRule(float, 0, 1, low_open=True),
    'beta_end': FieldRule(float, 0, 1, low_open=True),
    'num_train_timesteps': FieldRule(int, 1, 100_000),
    'steps': FieldRule(int, 1, 100_000),
    'guidance': FieldRule(float, 0, 1_000),
    'init_noise_scale': FieldRule(float, 0, 1_000, low_open=True),
    'refine_up_factor': FieldRule(int, 1, 64),
    'has_refine': FieldRule(bool),
    'sampler': FieldRule(str, choices=SAMPLERS),
    't_start': FieldRule(int, -1, 100_000),  # -1: the last training timestep
    'x0_clamp': FieldRule(float, 0, 10_000),  # metres; 0 = off
    'norm': FieldRule(str, choices=NORMS),
    'notes': FieldRule(dict),
}
MAX_FULL_POINTS = 10_000_000  # scan_points x replication: the points diffused per scene


def field_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be config field `name` (None when it can, or the field has no rule)."""
    rule = FIELD_RULES.get(name)
    return None if rule is None else rule.problem(value)


def check_fields(config: ModelConfig) -> None:
    """Raise UserError naming the first field that breaks its rule in FIELD_RULES."""
    for spec in dataclasses.fields(config):
        problem = field_problem(spec.name, getattr(config, spec.name))
        if problem is not None:
            raise UserError(f'config field "{spec.name}" {problem}')
    if config.full_points > MAX_FULL_POINTS:
        raise UserError(f'config fields "scan_points" x "replication" must be <= '
                        f'{MAX_FULL_POINTS:,}, got {config.full_points:,}')
