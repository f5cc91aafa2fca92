"""The formulation fields of a model config (sampler, t_start, x0_clamp, norm) and how sample()
and the Completer follow them; configs without the fields behave exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distdpo_ros.completion import (
    Completer,
    clamp_to_scene_box,
    initial_cloud,
    make_solver_for,
    sample,
    synthetic_scan,
)
from distdpo_ros.config import ModelConfig, preset
from distdpo_ros.diffusion import (
    VEDDIM,
    DPMSolverSDE,
    GuidedDenoiser,
    NoiseSchedule,
    VEAncestral,
    sample_residual,
)
from distdpo_ros.errors import UserError
from distdpo_ros.models import DiffusionNet

DEFAULT_MODELS = Path(__file__).resolve().parents[2] / 'distdpo_ros' / 'default_models'


def test_defaults_are_lidiffs_and_old_configs_load_with_them() -> None:
    config = ModelConfig()
    assert (config.sampler, config.t_start, config.x0_clamp, config.norm) == \
        ('dpm-solver++', -1, 0.0, 'batch')
    assert config.start_timestep == 999
    for name in ('teacher', 'student'):  # a config.json written before the fields existed
        data = json.loads((DEFAULT_MODELS / name / 'config.json').read_text())
        for field in ('sampler', 't_start', 'x0_clamp', 'norm'):
            data.pop(field, None)
        loaded = ModelConfig.from_dict(data)
        assert (loaded.sampler, loaded.start_timestep, loaded.x0_clamp, loaded.norm) == \
            ('dpm-solver++', 999, 0.0, 'batch')


def test_formulation_round_trips_through_json() -> None:
    config = preset('small').replace(sampler='ve-ancestral', t_start=300, x0_clamp=1.5,
                                     norm='group', steps=8)
    again = ModelConfig.from_dict(json.loads(config.to_json()))
    assert again == config


@pytest.mark.parametrize(('changes', 'field'), [
    ({'sampler': 'euler'}, 'sampler'),
    ({'norm': 'layer'}, 'norm'),
    ({'sampler': 've-ddim', 't_start': 1000}, 't_start'),
    ({'sampler': 've-ddim', 't_start': -2}, 't_start'),
    ({'sampler': 've-ddim', 't_start': 200.5}, 't_start'),
    ({'sampler': 've-ddim', 't_start': True}, 't_start'),
    ({'sampler': 've-ddim', 'x0_clamp': -1.0}, 'x0_clamp'),
    ({'sampler': 've-ddim', 'x0_clamp': float('nan')}, 'x0_clamp'),
    ({'sampler': 've-ddim', 'x0_clamp': float('inf')}, 'x0_clamp'),
    ({'t_start': 200}, 't_start'),  # LiDiff's sampler starts at T - 1
    ({'x0_clamp': 1.0}, 'x0_clamp'),  # and does not clamp
    ({'sampler': 've-ddim', 't_start': 20, 'steps': 50}, 'steps'),
])
def test_bad_formulation_is_refused_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(UserError, match=f'"{field}"'):
        preset('small').replace(**changes)


def test_good_formulations_validate() -> None:
    preset('small').replace(sampler='ve-ddim', t_start=200, x0_clamp=1.0, steps=8, norm='group')
    preset('small').replace(sampler='dpm-solver++', t_start=999)  # T - 1 spelled out is fine
    preset('small').replace(sampler='ve-ancestral', steps=1)


def test_make_solver_for_follows_the_config() -> None:
    base = preset('tiny')
    assert isinstance(make_solver_for(base), DPMSolverSDE)
    ve = base.replace(sampler='ve-ddim', t_start=300, x0_clamp=0.8, steps=4)
    run = make_solver_for(ve)
    assert isinstance(run, VEDDIM) and run.timesteps == [300, 225, 150, 75]
    assert run.x0_clamp == 0.8 and run.start_scale == NoiseSchedule().sigma(300)
    assert isinstance(make_solver_for(ve, 2, 've-ancestral'), VEAncestral)
    # an explicit LiDiff solver ignores the VE fields of the config
    assert make_solver_for(ve, 8, 'dpm-solver++').timesteps[0] == 999


@pytest.fixture(scope='module')
def tiny_net() -> DiffusionNet:
    torch.manual_seed(0)
    return DiffusionNet(preset('tiny')).eval()


def by_hand(net: DiffusionNet, scan: torch.Tensor, config: ModelConfig, run, seed: int
            ) -> torch.Tensor:
    """The sampling loop spelled out: guidance, the scene-box clamp, the solver on the residual."""
    denoiser = GuidedDenoiser(net, scan, config.guidance)
    return sample_residual(lambda x, t: denoiser(clamp_to_scene_box(x, config.max_range), t),
                           initial_cloud(scan, config.replication), run,
                           torch.Generator().manual_seed(seed), config.init_noise_scale)


def test_sample_uses_lidiffs_solver_by_default_bit_for_bit(tiny_net: DiffusionNet) -> None:
    config = preset('tiny').replace(steps=3)
    scan = torch.randn(1, config.scan_points, 3) * 5
    with torch.inference_mode():
        ours = sample(tiny_net, scan, config, generators=torch.Generator().manual_seed(1))
        explicit = sample(tiny_net, scan, config, sampler='dpm-solver++',
                          generators=torch.Generator().manual_seed(1))
        hand = by_hand(tiny_net, scan, config, DPMSolverSDE(NoiseSchedule(), 3), 1)
    assert torch.equal(ours, explicit) and torch.equal(ours, hand)


@pytest.mark.parametrize('sampler', ['ve-ddim', 've-ancestral'])
def test_sample_follows_the_configs_ve_sampler(tiny_net: DiffusionNet, sampler: str) -> None:
    config = preset('tiny').replace(sampler=sampler, t_start=250, x0_clamp=0.7, steps=3)
    scan = torch.randn(1, config.scan_points, 3) * 5
    cls = VEDDIM if sampler == 've-ddim' else VEAncestral
    with torch.inference_mode():
        ours = sample(tiny_net, scan, config, generators=torch.Generator().manual_seed(2))
        hand = by_hand(tiny_net, scan, config, cls(NoiseSchedule(), 3, 250, 0.7), 2)
        lidiff = sample(tiny_net, scan, config, sampler='dpm-solver++',
                        generators=torch.Generator().manual_seed(2))
    assert torch.equal(ours, hand)
    x_init = initial_cloud(scan, config.replication)
    assert (ours - x_init).norm(dim=-1).max().item() <= 0.7 + 1e-5  # the clamp holds
    assert (lidiff - x_init).norm(dim=-1).max().item() > 0.7


def test_completer_uses_the_models_sampler(tiny_model_dir: Path, tmp_path: Path) -> None:
    from distdpo_ros.checkpoint import load_model, save_model

    bundle = load_model(tiny_model_dir)
    bundle.config = bundle.config.replace(sampler='ve-ddim', t_start=200, x0_clamp=0.5)
    path = save_model(tmp_path / 've-model', bundle)
    completer = Completer.from_pretrained(path, device='cpu')
    assert completer.config.sampler == 've-ddim'
    scan = synthetic_scan(seed=3)
    own = completer.complete(scan, seed=0)
    assert (own == completer.complete(scan, seed=0, sampler='ve-ddim')).all()
    lidiff = completer.complete(scan, seed=0, sampler='dpm-solver++')
    assert own.shape != lidiff.shape or not (own == lidiff).all()
