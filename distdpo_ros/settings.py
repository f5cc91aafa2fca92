"""How one completion is sampled: one type, resolved and checked once against the model.

In Python, ``None`` means "the model's own value" (its config's ``steps`` and ``guidance``). Where
a value must be a number (ROS parameters, YAML configs, replay options) the model's own is spelled
``0`` for steps and ``-1`` for guidance (0 is a real guidance weight); :meth:`SamplingSettings.
from_parameters` is the one place that reads that spelling. :meth:`SamplingSettings.resolved`
fills in the model's values and checks everything against the model, so the node, the CLI,
evaluation and the training loops refuse the same things with the same words.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from distdpo_ros.config import SAMPLERS, ModelConfig
from distdpo_ros.errors import UserError

MODEL_STEPS = 0  # "the model's own" where steps must be a number
MODEL_GUIDANCE = -1.0  # "the model's own" where guidance must be a number


@dataclass(frozen=True)
class SamplingSettings:
    """Steps, guidance weight, refinement and sampler of a completion (None: the model's)."""

    steps: int | None = None
    guidance: float | None = None
    refine: bool = False
    sampler: str | None = None  # the sampler (distdpo_ros.diffusion.SOLVERS); None: the model's

    @classmethod
    def from_parameters(cls, steps: int = MODEL_STEPS, guidance: float = MODEL_GUIDANCE,
                        refine: bool = False, sampler: str | None = None) -> SamplingSettings:
        """From the numeric spelling: steps 0 and guidance -1 stand for the model's own.

        Other negative values are refused (UserError) rather than silently taken as "own".
        """
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise UserError(f'steps must be a whole number >= 1, or {MODEL_STEPS} for the '
                            f"model's own; got {steps!r}")
        guidance = float(guidance)
        if guidance != MODEL_GUIDANCE and not (math.isfinite(guidance) and guidance >= 0):
            raise UserError(f'guidance must be a finite number >= 0, or {MODEL_GUIDANCE:g} for '
                            f"the model's own; got {guidance!r}")
        if sampler and sampler not in SAMPLERS:
            raise UserError(f'unknown sampler {sampler!r}; choose one of {", ".join(SAMPLERS)}, '
                            "or none for the model's own")
        return cls(steps=int(steps) or None,
                   guidance=None if guidance == MODEL_GUIDANCE else guidance,
                   refine=bool(refine), sampler=sampler or None)

    def resolved(self, config: ModelConfig, has_refine: bool | None = None) -> SamplingSettings:
        """The concrete settings for a model (no None left); UserError names what does not fit.

        `has_refine` defaults to the config's own flag.
        """
        from distdpo_ros.diffusion import SOLVERS, VE_SOLVERS, timestep_grid

        sampler = self.sampler or config.sampler
        if sampler not in SOLVERS:
            raise UserError(f'unknown sampler {sampler!r}; choose one of {sorted(SOLVERS)}')
        steps = config.steps if self.steps is None else self.steps
        if isinstance(steps, bool) or int(steps) != steps:
            raise UserError(f'steps must be a whole number, got {steps!r}')
        start = config.start_timestep if sampler in VE_SOLVERS else None
        timestep_grid(int(steps), config.num_train_timesteps, start)  # raises with the range
        guidance = config.guidance if self.guidance is None else float(self.guidance)
        if not (math.isfinite(guidance) and guidance >= 0):
            raise UserError(f'guidance must be a finite number >= 0, got {guidance!r}')
        if self.refine and not (config.has_refine if has_refine is None else has_refine):
            raise UserError('refinement requested but this model has no refinement weights')
        return SamplingSettings(int(steps), guidance, self.refine, sampler)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``Completer.complete`` (sampler only when one is chosen)."""
        out: dict[str, Any] = {'steps': self.steps, 'guidance': self.guidance,
                               'refine': self.refine}
        if self.sampler:
            out['sampler'] = self.sampler
        return out

    def replace(self, **changes: Any) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """'steps 8, guidance 3.5, refine off' (None shown as "model's")."""
        def show(value: Any) -> str:
            return "model's" if value is None else f'{value:g}'

        return (f'steps {show(self.steps)}, guidance {show(self.guidance)}, '
                f'refine {"on" if self.refine else "off"}'
                + (f', sampler {self.sampler}' if self.sampler else ''))
