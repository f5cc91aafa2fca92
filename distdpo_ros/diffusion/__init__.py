"""Local point diffusion: schedule, noising, solvers, classifier-free guidance, sampling loop."""

from distdpo_ros.diffusion.guidance import ConditionalNoiseModel, GuidedDenoiser, apply_guidance
from distdpo_ros.diffusion.sampling import randn, sample_residual
from distdpo_ros.diffusion.schedule import NoiseSchedule, timestep_grid
from distdpo_ros.diffusion.solvers import (
    SOLVERS,
    VE_SOLVERS,
    VEDDIM,
    DDPMAncestral,
    DPMSolverSDE,
    Solver,
    VEAncestral,
    make_solver,
)

__all__ = [
    'SOLVERS', 'VEDDIM', 'VE_SOLVERS', 'ConditionalNoiseModel', 'DDPMAncestral', 'DPMSolverSDE',
    'GuidedDenoiser', 'NoiseSchedule', 'Solver', 'VEAncestral', 'apply_guidance', 'make_solver',
    'randn', 'sample_residual', 'timestep_grid',
]
