"""Local point diffusion: schedule, noising, solvers, classifier-free guidance, sampling loop."""

from distdpo_ros.diffusion.guidance import ConditionalNoiseModel, GuidedDenoiser, apply_guidance
from distdpo_ros.diffusion.sampling import randn, sample_residual
from distdpo_ros.diffusion.schedule import NoiseSchedule, timestep_grid
from distdpo_ros.diffusion.solvers import SOLVERS, DDPMAncestral, DPMSolverSDE, Solver, make_solver

__all__ = [
    'SOLVERS', 'ConditionalNoiseModel', 'DDPMAncestral', 'DPMSolverSDE', 'GuidedDenoiser',
    'NoiseSchedule', 'Solver', 'apply_guidance', 'make_solver', 'randn', 'sample_residual',
    'timestep_grid',
]
