"""Checkpoints: our safetensors format, the restricted import of Lightning checkpoints, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from distdpo_ros import checkpoint as ckpt
from distdpo_ros import lightning_import as lightning
from distdpo_ros import safe_pickle
from distdpo_ros.cli import main as cli_main
from distdpo_ros.config import preset
from distdpo_ros.errors import UserError

# The published LiDiff training config (lidiff/config/config.yaml), with values changed where our
# defaults coincide, so that the test sees each field travel into ModelConfig.
LIDIFF_HPARAMS = {
    'experiment': {'id': 'prob10_5p0reg'},
    'data': {'resolution': 0.1, 'num_points': 20000, 'max_range': 40.0, 'dataloader': 'KITTI'},
    'train': {'uncond_prob': 0.1, 'uncond_w': 5.0, 'lr': 0.0001, 'batch_size': 2},
    'diff': {'beta_start': 3.5e-5, 'beta_end': 0.007, 'beta_func': 'linear', 't_steps': 1000,
             's_steps': 40, 'reg_weight': 5.0},
    'model': {'out_dim': 96},
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def made_up_tensors(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the names and shapes of the config's networks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in ckpt.expected_shapes(config).items():
        if key.endswith('num_batches_tracked'):
            out[key] = torch.randint(0, 1000, shape, generator=gen, dtype=torch.int64)
        else:
            out[key] = torch.randn(shape, generator=gen)
    return out


def renamed(tensors: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Our keys -> the keys of a published checkpoint, e.g. {'denoiser.': 'model.'}."""
    out = OrderedDict()
    for key, value in tensors.items():
        ours = next(p for p in mapping if key.startswith(p))
        out[mapping[ours] + key[len(ours):]] = value
    return out


def _fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for attr, value in attrs.items():
        if isinstance(value, type) or callable(value):
            value.__module__, value.__qualname__ = name, attr
        setattr(module, attr, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def save_lightning_style(path: Path, state_dict: dict[str, torch.Tensor], hparams=None,
                         extra: dict | None = None) -> Path:
    """Write what Lightning 1.x writes: a torch.save'd dict whose pickle names Lightning classes
    (AttributeDict hyper-parameters, a callback class as dict key) and whose tensors are tagged
    as saved from 'cuda:0' like the published ones. Lightning is faked while saving only;
    afterwards none of its modules exist."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        class AttributeDict(dict):
            pass

        class ModelCheckpoint:
            pass

        _fake_module(mp, 'pytorch_lightning')
        _fake_module(mp, 'pytorch_lightning.utilities')
        _fake_module(mp, 'pytorch_lightning.utilities.parsing', AttributeDict=AttributeDict)
        _fake_module(mp, 'pytorch_lightning.callbacks')
        _fake_module(mp, 'pytorch_lightning.callbacks.model_checkpoint',
                     ModelCheckpoint=ModelCheckpoint)
        # What Adam and ExponentialLR state_dict() hold (built by hand: a real optimizer step
        # would import torch's compiler stack, seconds of test time).
        adam = {'state': {0: {'step': torch.tensor(1.0), 'exp_avg': torch.randn(4),
                              'exp_avg_sq': torch.rand(4)}},
                'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.999), 'eps': 1e-8,
                                  'weight_decay': 0, 'amsgrad': False, 'params': [0]}]}
        scheduler = {'gamma': 0.5, 'base_lrs': [1e-4], 'last_epoch': 3, '_step_count': 4,
                     '_last_lr': [1.25e-5]}
        data = {
            'epoch': 19, 'global_step': 191300, 'pytorch-lightning_version': '1.5.10',
            'state_dict': OrderedDict(state_dict),
            'callbacks': {ModelCheckpoint: {'best_model_score': torch.tensor(0.25),
                                            'best_model_path': 'epoch=19.ckpt',
                                            'last_score': np.float64(0.5),
                                            'monitors': {'val/cd_mean'}}},
            'optimizer_states': [adam],
            'lr_schedulers': [scheduler],
            **(extra or {}),
        }
        if hparams is not None:
            data['hyper_parameters'] = AttributeDict(hparams)
            data['hparams_name'] = 'kwargs'
        torch.save(data, path)
    assert 'pytorch_lightning' not in sys.modules
    return path


@pytest.fixture(scope='module')
def tiny():
    """Tiny-scale teacher config with a refinement net and matching weights."""
    config = preset('tiny', 'teacher').replace(has_refine=True)
    return config, made_up_tensors(config)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(['import-ckpt', *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rewrite_records(path: Path, change) -> None:
    """Rewrite a torch zip checkpoint with `change(name, data) -> data` applied to each record."""
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in records.items():
            archive.writestr(name, change(name, data))


# ---------------------------------------------------------------------------------------------
# our format
# ---------------------------------------------------------------------------------------------

def test_save_load_round_trip_is_exact(tmp_path, tiny):
    config, tensors = tiny
    out = ckpt.save_checkpoint(tmp_path / 'model', config.replace(notes={'run': 'x'}), tensors)
    assert sorted(p.name for p in out.iterdir()) == [ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ['model']  # no temporary directory left
    loaded_config, loaded = ckpt.load_checkpoint(out)
    assert loaded_config == config.replace(notes={'run': 'x'})
    assert_same_tensors(loaded, tensors)
    assert json.loads((out / ckpt.CONFIG_FILE).read_text())['channel_ratio'] == 0.125


def test_has_refine_follows_the_weights(tmp_path, tiny):
    config, tensors = tiny
    without = {k: v for k, v in tensors.items() if not k.startswith('refine.')}
    ckpt.save_checkpoint(tmp_path / 'm', config, without)  # config said has_refine=True
    assert ckpt.load_config(tmp_path / 'm').has_refine is False


def test_weights_that_do_not_fit_are_refused(tmp_path, tiny):
    config, tensors = tiny
    with pytest.raises(UserError, match=r'channel_ratio=0\.25\): \S+ has shape'):
        ckpt.save_checkpoint(tmp_path / 'm', config.replace(channel_ratio=0.25), tensors)
    missing = dict(tensors)
    del missing['denoiser.stem.0.kernel']
    with pytest.raises(UserError, match="missing, first 'denoiser.stem.0.kernel'"):
        ckpt.save_checkpoint(tmp_path / 'm', config, missing)
    with pytest.raises(UserError, match="do not have, first 'denoiser.extra'"):
        ckpt.save_checkpoint(tmp_path / 'm', config, {**tensors, 'denoiser.extra': torch.ones(1)})
    assert not (tmp_path / 'm').exists()


def test_config_that_does_not_fit_the_weights_is_refused_on_load(tmp_path, tiny):
    config, tensors = tiny
    out = ckpt.save_checkpoint(tmp_path / 'm', config, tensors)
    data = json.loads((out / ckpt.CONFIG_FILE).read_text())
    data['channel_ratio'] = 0.25
    (out / ckpt.CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError, match=r'weights\.safetensors: the weights do not fit'):
        ckpt.load_checkpoint(out)


@pytest.mark.parametrize('damage, message', [
    ('truncate', 'truncated or corrupt'),
    ('flip_data_byte', 'do not match the checksum'),
    ('garbage_header', 'truncated or corrupt'),
    ('delete_weights', 'missing; the checkpoint has no weights'),
    ('bad_json', r'config\.json: not valid JSON'),
    ('unknown_field', r"config\.json: unknown config field\(s\) \['chanel_ratio'\]"),
    ('bad_value', r'config\.json: config field "resolution" must be >= 0.001'),
    ('delete_config', r'config\.json: missing'),
])
def test_damaged_checkpoint_gives_one_line_naming_the_file(tmp_path, tiny, damage, message):
    config, tensors = tiny
    out = ckpt.save_checkpoint(tmp_path / 'm', config, tensors)
    weights, config_file = out / ckpt.WEIGHTS_FILE, out / ckpt.CONFIG_FILE
    raw = weights.read_bytes()
    if damage == 'truncate':
        weights.write_bytes(raw[:len(raw) // 2])
    elif damage == 'flip_data_byte':
        weights.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0x40]) + raw[-9:])
    elif damage == 'garbage_header':
        weights.write_bytes(b'\xff' * 8 + raw[8:])
    elif damage == 'delete_weights':
        weights.unlink()
    elif damage == 'bad_json':
        config_file.write_text('{"scale": "tiny",')
    elif damage == 'unknown_field':
        config_file.write_text(json.dumps({'chanel_ratio': 0.125}))
    elif damage == 'bad_value':
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                           'resolution': -1}))
    elif damage == 'delete_config':
        config_file.unlink()
    with pytest.raises(UserError, match=message) as info:
        ckpt.load_checkpoint(out)
    assert '\n' not in str(info.value)
    assert str(out) in str(info.value)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    config, tensors = tiny
    out = ckpt.save_checkpoint(tmp_path / 'm', config, tensors)
    newer = made_up_tensors(config, seed=1)

    def crash_halfway(weights, filename, metadata=None):
        Path(filename).write_bytes(b'\x00' * 100)  # a half-written file, then the disk fills up
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(safetensors.torch, 'save_file', crash_halfway)
    with pytest.raises(UserError, match='No space left on device.*previous .*unchanged'):
        ckpt.save_checkpoint(out, config, newer, overwrite=True)
    monkeypatch.undo()
    assert_same_tensors(ckpt.load_checkpoint(out)[1], tensors)
    assert [p.name for p in tmp_path.iterdir()] == ['m']


def test_replacing_a_checkpoint_needs_overwrite(tmp_path, tiny):
    config, tensors = tiny
    out = ckpt.save_checkpoint(tmp_path / 'm', config, tensors)
    newer = made_up_tensors(config, seed=2)
    with pytest.raises(UserError, match='already holds a checkpoint'):
        ckpt.save_checkpoint(out, config, newer)
    ckpt.save_checkpoint(out, config, newer, overwrite=True)
    assert_same_tensors(ckpt.load_checkpoint(out)[1], newer)
    assert [p.name for p in tmp_path.iterdir()] == ['m']
    other = tmp_path / 'notes'
    other.mkdir()
    (other / 'todo.txt').write_text('keep me')
    with pytest.raises(UserError, match='not a checkpoint; refusing to replace it'):
        ckpt.save_checkpoint(other, config, tensors, overwrite=True)
    assert (other / 'todo.txt').read_text() == 'keep me'


def test_model_names_resolve(tmp_path, tiny, monkeypatch):
    config, tensors = tiny
    monkeypatch.setattr(ckpt, 'DEFAULT_MODELS_DIR', tmp_path / 'default_models')
    with pytest.raises(UserError, match="model 'default' is not shipped .* does not exist"):
        ckpt.load_checkpoint('default')
    ckpt.save_checkpoint(tmp_path / 'default_models' / 'teacher', config, tensors)
    assert ckpt.resolve_model('default-teacher') == tmp_path / 'default_models' / 'teacher'
    assert ckpt.load_config('default-teacher') == config
    lightning_file = tmp_path / 'diff_net.ckpt'
    lightning_file.write_bytes(b'PK')
    with pytest.raises(UserError, match='convert it first: distdpo import-ckpt'):
        ckpt.load_checkpoint(lightning_file)
    with pytest.raises(UserError, match='no such checkpoint directory'):
        ckpt.load_checkpoint(tmp_path / 'nowhere')


def test_load_model_builds_networks_in_eval_mode(tmp_path, tiny):
    config, tensors = tiny
    out = ckpt.save_checkpoint(tmp_path / 'm', config, tensors)
    bundle = ckpt.load_model(out)
    assert bundle.config == config
    assert not bundle.diffusion.training and not bundle.refine.training
    state = bundle.diffusion.state_dict()
    assert torch.equal(state['denoiser.stem.0.kernel'], tensors['denoiser.stem.0.kernel'])
    assert torch.equal(bundle.refine.state_dict()['model.last.2.weight'],
                       tensors['refine.last.2.weight'])
    ckpt.save_model(tmp_path / 'again', bundle)
    assert_same_tensors(ckpt.load_checkpoint(tmp_path / 'again')[1], tensors)


def test_saved_and_loaded_network_computes_the_same(tmp_path, one_thread):
    from distdpo_ros.models import DiffusionNet

    config = preset('tiny', 'student')
    torch.manual_seed(0)
    net = DiffusionNet(config)
    for buffer in net.buffers():  # non-trivial BatchNorm statistics
        if buffer.is_floating_point():
            buffer.uniform_(0.5, 1.5)
    net.eval()
    ckpt.save_model(tmp_path / 'm', ckpt.ModelBundle(config, net))
    loaded = ckpt.load_model(tmp_path / 'm').diffusion
    assert all(p.requires_grad for p in loaded.parameters())  # trainable as loaded
    scan = torch.randn(1, 64, 3) * 4
    x_t = scan.repeat(1, 4, 1) + torch.randn(1, 256, 3)
    with torch.no_grad():
        want = net(x_t, torch.tensor([500]), net.encode(scan))
        got = loaded(x_t, torch.tensor([500]), loaded.encode(scan))
    assert got.shape == (1, 256, 3) and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Lightning import
# ---------------------------------------------------------------------------------------------

def test_lidiff_checkpoints_import_through_the_cli(tmp_path, tiny, capsys):
    config, tensors = tiny
    diffusion = {k: v for k, v in tensors.items() if not k.startswith('refine.')}
    refine = {k: v for k, v in tensors.items() if k.startswith('refine.')}
    diff_ckpt = save_lightning_style(
        tmp_path / 'diff_net.ckpt', renamed(diffusion, {'denoiser.': 'model.',
                                                         'encoder.': 'partial_enc.'}),
        hparams=LIDIFF_HPARAMS)
    refine_ckpt = save_lightning_style(tmp_path / 'refine_net.ckpt',
                                       renamed(refine, {'refine.': 'model_refine.'}),
                                       hparams={'data': {'resolution': 0.5}})
    code, out, err = run_cli(capsys, diff_ckpt, tmp_path / 'out', '--refine', refine_ckpt)
    assert (code, err) == (0, '')
    assert 'LiDiff diffusion checkpoint' in out
    assert 'pytorch_lightning' not in sys.modules

    loaded_config, loaded = ckpt.load_checkpoint(tmp_path / 'out')
    assert_same_tensors(loaded, tensors)
    assert (loaded_config.role, loaded_config.scale, loaded_config.has_refine) == \
        ('teacher', 'full', True)
    assert loaded_config.channel_ratio == 0.125  # read from the weights
    # from hyper_parameters (the refinement checkpoint's are not used for the diffusion config)
    assert (loaded_config.resolution, loaded_config.scan_points, loaded_config.max_range,
            loaded_config.guidance, loaded_config.steps) == (0.1, 2000, 40.0, 5.0, 40)
    source = loaded_config.notes['source']
    assert (source['kind'], source['file'], source['epoch']) == ('lidiff', 'diff_net.ckpt', 19)
    assert source['hyper_parameters'] == LIDIFF_HPARAMS
    assert loaded_config.notes['refine_source']['kind'] == 'lidiff-refine'


def test_distillation_dpo_student_keeps_generator_and_encoder(tmp_path, tiny):
    config, tensors = tiny
    diffusion = {k: v for k, v in tensors.items() if not k.startswith('refine.')}
    state = renamed(diffusion, {'denoiser.': 'generator.', 'encoder.': 'partial_enc.'})
    for copy in ('teacher.', 'auxDiffBetter.', 'auxDiffWorse.'):
        state.update({copy + k.removeprefix('generator.'): torch.zeros(1)
                      for k in state if k.startswith('generator.')})
    path = save_lightning_style(tmp_path / 'distillationdpo_st.ckpt', state)  # no hparams
    student_config, imported = lightning.import_lightning_checkpoint(path)
    assert_same_tensors(imported, diffusion)
    assert (student_config.role, student_config.steps, student_config.guidance) == \
        ('student', 8, 3.5)
    assert student_config.notes['source']['ignored'] == \
        ['auxDiffBetter.*', 'auxDiffWorse.*', 'teacher.*']


def test_distillation_dpo_teacher_and_refine_only(tmp_path, tiny):
    config, tensors = tiny
    state = renamed({k: v for k, v in tensors.items()},
                    {'denoiser.': 'DiffModel.', 'encoder.': 'DM_encoder.',
                     'refine.': 'model_refine.'})
    teacher_config, imported = lightning.import_lightning_checkpoint(
        save_lightning_style(tmp_path / 'lidiff_ddpo_refined.ckpt', state))
    assert (teacher_config.role, teacher_config.has_refine) == ('teacher', True)
    assert_same_tensors(imported, tensors)

    refine_only = renamed({k: v for k, v in tensors.items() if k.startswith('refine.')},
                          {'refine.': 'model_refine.'})
    refine_config, imported = lightning.import_lightning_checkpoint(
        save_lightning_style(tmp_path / 'refine_net.ckpt', refine_only))
    assert refine_config.role == 'refine' and refine_config.channel_ratio == 0.125
    ckpt.save_checkpoint(tmp_path / 'r', refine_config, imported)
    with pytest.raises(UserError, match='holds only refinement weights'):
        ckpt.load_model(tmp_path / 'r')


def test_lightning_names_become_inert_stand_ins(tmp_path, tiny):
    """A Lightning-named callable in the pickle is never called; Lightning is never imported."""
    config, tensors = tiny
    marker = tmp_path / 'ran'

    def write_marker(path):
        Path(path).write_text('code ran')

    with pytest.MonkeyPatch.context() as mp:
        _fake_module(mp, 'pytorch_lightning.utilities.cloud_io', write_marker=write_marker)

        class Payload:
            def __reduce__(self):
                return write_marker, (str(marker),)

        extra = {'loops': Payload()}
        state = renamed({k: v for k, v in tensors.items() if not k.startswith('refine.')},
                        {'denoiser.': 'model.', 'encoder.': 'partial_enc.'})
        path = save_lightning_style(tmp_path / 'x.ckpt', state, LIDIFF_HPARAMS, extra)
    data = safe_pickle.read_lightning_checkpoint(path)
    assert not marker.exists()
    assert isinstance(data['loops'], safe_pickle.LightningStandIn)
    assert data['loops'].pickled_args == (str(marker),)
    assert data['loops'].origin == 'pytorch_lightning.utilities.cloud_io.write_marker'
    assert dict(data['hyper_parameters']) == LIDIFF_HPARAMS
    assert isinstance(data['optimizer_states'][0]['state'][0]['exp_avg'], torch.Tensor)
    (callback_class, callback), = data['callbacks'].items()
    assert callback_class.origin == 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint'
    assert (callback['last_score'], callback['monitors']) == (0.5, {'val/cd_mean'})


class _Evil:
    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == 'os.system':
            return os.system, (f'touch {self.marker}',)
        if self.how == 'eval':
            return eval, (f'open({str(self.marker)!r}, "w").close()',)
        return torch.save, ({}, str(self.marker))  # a torch global outside the allowed list


@pytest.mark.parametrize('how, named', [('os.system', 'posix.system'), ('eval', 'builtins.eval'),
                                        ('torch.save', 'torch.serialization.save')])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys, how, named):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.ckpt'
    torch.save({'state_dict': {'model.stem.0.kernel': torch.zeros(27, 3, 32)},
                'hyper_parameters': {'data': _Evil(how, marker)}}, path)
    with pytest.raises(UserError, match=f'refusing to unpickle {named}: only tensors'):
        safe_pickle.read_lightning_checkpoint(path)
    code, out, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and out == ''
    assert err.startswith(f'distdpo: error: {path}: refusing to unpickle {named}')
    assert err.count('\n') == 1
    assert not marker.exists() and not (tmp_path / 'out').exists()


def test_pickle_that_would_modify_an_allowed_function_is_refused(tmp_path):
    """BUILD on an allowed global (torch's own tensor rebuild function) would rewrite it."""
    path = tmp_path / 'tamper.ckpt'
    torch.save({}, path)
    tampering = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n'  # push the function, then
                 b'N}X\x0c\x00\x00\x00__defaults__)s\x86b.')  # BUILD (None, {'__defaults__': ()})
    rewrite_records(path, lambda name, data: tampering if name.endswith('/data.pkl') else data)
    before = torch._utils._rebuild_tensor_v2.__defaults__
    with pytest.raises(UserError, match='refusing to unpickle a state change of the function '
                                        '_rebuild_tensor_v2'):
        safe_pickle.read_lightning_checkpoint(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


@pytest.mark.parametrize('content, message', [
    (None, 'no such checkpoint file'),
    (b'not a checkpoint at all', 'not a readable PyTorch checkpoint'),
    ('plain-tensor', 'holds a Tensor, not a checkpoint dict'),
    ('foreign', r'not a LiDiff or Distillation-DPO checkpoint \(its state_dict holds backbone'),
    ('bad-hparams', r'hyper_parameters\.diff\.beta_func is .cosine.'),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, tiny, content, message):
    path = tmp_path / 'in.ckpt'
    config, tensors = tiny
    lidiff = renamed({k: v for k, v in tensors.items() if not k.startswith('refine.')},
                     {'denoiser.': 'model.', 'encoder.': 'partial_enc.'})
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == 'plain-tensor':
        torch.save(torch.zeros(3), path)
    elif content == 'foreign':
        save_lightning_style(path, {'backbone.conv.weight': torch.zeros(2)})
    elif content == 'bad-hparams':
        save_lightning_style(path, lidiff, {**LIDIFF_HPARAMS, 'diff': {'beta_func': 'cosine'}})
    code, out, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and out == ''
    assert err.startswith('distdpo: error: ') and err.count('\n') == 1
    assert re.search(message, err)
    assert not (tmp_path / 'out').exists()


def test_import_refuses_to_replace_without_force(tmp_path, tiny, capsys):
    config, tensors = tiny
    state = renamed({k: v for k, v in tensors.items() if not k.startswith('refine.')},
                    {'denoiser.': 'model.', 'encoder.': 'partial_enc.'})
    path = save_lightning_style(tmp_path / 'diff_net.ckpt', state, LIDIFF_HPARAMS)
    assert run_cli(capsys, path, tmp_path / 'out')[0] == 0
    code, _, err = run_cli(capsys, path, tmp_path / 'out', '--steps', '20')
    assert code == 2 and 'already holds a checkpoint' in err and '--force' in err
    assert run_cli(capsys, path, tmp_path / 'out', '--steps', '20', '--force')[0] == 0
    assert ckpt.load_config(tmp_path / 'out').steps == 20


# ---------------------------------------------------------------------------------------------
# the published layout at full scale (reference manifest)
# ---------------------------------------------------------------------------------------------

def read_manifest(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if not line or line.startswith('#'):
            continue
        if line.startswith('['):
            current = sections.setdefault(line[1:line.index(']')], {})
            continue
        key, shape, _ = line.split('\t')
        current[key] = tuple(int(d) for d in shape.split(',')) if shape else ()
    return sections


def test_full_scale_lidiff_checkpoint_loads_strictly(tmp_path, shared_data, capsys):
    """A checkpoint with exactly the published key set and shapes (read from the reference code)
    imports and loads into DiffusionNet / RefineNet with strict=True at channel ratio 1.0."""
    manifest_path = shared_data.parent / 'reference' / 'lidiff_state_dict_manifest.txt'
    if not manifest_path.is_file():
        pytest.skip(f'{manifest_path} is missing')
    manifest = read_manifest(manifest_path)

    def filled(prefix: str, section: str, start: int) -> dict[str, torch.Tensor]:
        # Constant per tensor (cheap at 54 M values) and distinct, so a mix-up of keys shows.
        return {prefix + key: (torch.full(shape, start + i, dtype=torch.int64)
                               if key.endswith('num_batches_tracked')
                               else torch.full(shape, float(start + i)))
                for i, (key, shape) in enumerate(manifest[section].items())}

    diff_state = {**filled('model.', 'MinkUNetDiff', 0),
                  **filled('partial_enc.', 'MinkGlobalEnc', 1000)}
    refine_state = filled('model_refine.', 'MinkUNet_refine', 2000)
    diff_ckpt = save_lightning_style(tmp_path / 'diff_net.ckpt', diff_state,
                                     hparams={**LIDIFF_HPARAMS, 'data': {'resolution': 0.05}})
    refine_ckpt = save_lightning_style(tmp_path / 'refine_net.ckpt', refine_state)
    del diff_state, refine_state
    code, _, err = run_cli(capsys, diff_ckpt, tmp_path / 'lidiff', '--refine', refine_ckpt)
    assert (code, err) == (0, '')
    bundle = ckpt.load_model(tmp_path / 'lidiff')
    assert bundle.config.channel_ratio == 1.0 and bundle.config.refine_up_factor == 6
    denoiser = bundle.diffusion.denoiser.state_dict()
    encoder = bundle.diffusion.encoder.state_dict()
    refine = bundle.refine.model.state_dict()
    assert {k: tuple(v.shape) for k, v in denoiser.items()} == manifest['MinkUNetDiff']
    assert {k: tuple(v.shape) for k, v in encoder.items()} == manifest['MinkGlobalEnc']
    assert {k: tuple(v.shape) for k, v in refine.items()} == manifest['MinkUNet_refine']
    for state, section, start in ((denoiser, 'MinkUNetDiff', 0), (encoder, 'MinkGlobalEnc', 1000),
                                  (refine, 'MinkUNet_refine', 2000)):
        for i, key in enumerate(manifest[section]):
            assert state[key].flatten()[0].item() == start + i, key


def test_group_norm_models_save_and_load_with_their_own_weight_names(tmp_path):
    from distdpo_ros.models import DiffusionNet, RefineNet

    config = preset('tiny', 'student').replace(norm='group', has_refine=True)
    torch.manual_seed(0)
    bundle = ckpt.ModelBundle(config=config, diffusion=DiffusionNet(config),
                              refine=RefineNet(config))
    out = ckpt.save_model(tmp_path / 'group', bundle)
    loaded = ckpt.load_model(out)
    assert loaded.config.norm == 'group'
    keys = set(loaded.diffusion.state_dict())
    assert not any('running_mean' in k for k in keys)  # no BatchNorm statistics to carry
    for key, value in bundle.diffusion.state_dict().items():
        assert torch.equal(loaded.diffusion.state_dict()[key], value), key
    with pytest.raises(UserError):  # a BatchNorm config does not fit group-norm weights
        ckpt.save_checkpoint(tmp_path / 'bad', config.replace(norm='batch'),
                             dict(bundle.diffusion.state_dict()))


# ---------------------------------------------------------------------------------------------
# hostile checkpoints found by an independent probe (issue 17)
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def lidiff_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return renamed({k: v for k, v in tensors.items() if not k.startswith('refine.')},
                   {'denoiser.': 'model.', 'encoder.': 'partial_enc.'})


def import_in_subprocess(ckpt_path: Path, out: Path, timeout: float = 120,
                         ) -> subprocess.CompletedProcess:
    """`distdpo import-ckpt` in its own process: a crash (SIGSEGV) shows as its exit code."""
    return subprocess.run([sys.executable, '-m', 'distdpo_ros.cli', 'import-ckpt',
                           str(ckpt_path), str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class CraftedDtype:
    """Pickles as numpy.dtype(code) followed by BUILD with an arbitrary state."""

    def __init__(self, code: str, state: tuple) -> None:
        self.code, self.state = code, state

    def __reduce__(self):
        return np.dtype, (self.code, False, True), self.state


class CraftedScalar:
    """Pickles as numpy's scalar(dtype, raw bytes): the bytes become the scalar's value."""

    def __init__(self, dtype, data: bytes) -> None:
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        from numpy._core.multiarray import scalar

        return scalar, (self.dtype, self.data)


@pytest.mark.parametrize('fields', [
    {'a': (np.dtype('O'), 0)},  # an object field without the object flag: a chosen pointer
    {'a': (np.dtype('f8'), 10**9)},  # a field 1 GB past the scalar's 8 bytes
], ids=['object-field', 'field-offset'])
def test_crafted_numpy_dtype_is_refused_not_a_crash(tmp_path, tiny, fields):
    """Before the fix `import-ckpt` died with SIGSEGV (exit 139) when recording the provenance
    (`.item()` on the scalar). dtypes are now rebuilt from a whitelist of plain numeric codes."""
    config, tensors = tiny
    dtype = CraftedDtype('V8', (3, '|', None, ('a',), fields, 8, 1, 0))
    path = tmp_path / 'crafted.ckpt'
    torch.save({'state_dict': lidiff_state(tensors), 'epoch': CraftedScalar(dtype, b'A' * 8)},
               path)
    result = import_in_subprocess(path, tmp_path / 'out')
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count('\n') == 1 and str(path) in result.stderr
    assert "refusing to unpickle numpy.dtype('V8'" in result.stderr
    assert not (tmp_path / 'out').exists()


def test_plain_numpy_scalars_still_load(tmp_path, tiny):
    config, tensors = tiny
    path = tmp_path / 'scalars.ckpt'
    values = {'f8': np.float64(0.25), 'f4': np.float32(-1.5), 'i8': np.int64(-7),
              'u1': np.uint8(200), 'b1': np.bool_(True), 'be': np.dtype('>i4').type(5)}
    torch.save({'state_dict': lidiff_state(tensors), 'extra': values}, path)
    extra = safe_pickle.read_lightning_checkpoint(path)['extra']
    assert extra == values and [type(v) for v in extra.values()] == \
        [type(v) for v in values.values()]


def _write_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip archive from raw entries (name, stored bytes, method, crc32, uncompressed size):
    zipfile cannot store bytes compressed elsewhere."""
    import struct

    body, directory = bytearray(), bytearray()
    for name, data, method, crc, size in entries:
        raw = name.encode()
        offset = len(body)
        body += struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, method, 0, 0x21, crc, len(data),
                            size, len(raw), 0) + raw + data
        directory += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, method, 0, 0x21,
                                 crc, len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, len(entries), len(entries), len(directory),
                      len(body), 0)
    path.write_bytes(bytes(body + directory + end))


def test_zip_bomb_is_refused_before_decompression(tmp_path, tiny):
    """A ~1.5 MB .ckpt whose data.pkl inflates to 1.5 GB: before the fix import-ckpt grew to
    2 GB and spun for minutes. It is refused from the archive directory, in its own process,
    in seconds and without memory growth."""
    import resource
    import zlib

    config, tensors = tiny
    real = tmp_path / 'real.ckpt'
    torch.save({'state_dict': lidiff_state(tensors)}, real)
    with zipfile.ZipFile(real) as archive:
        others = [(i.filename, archive.read(i.filename)) for i in archive.infolist()
                  if not i.filename.endswith('data.pkl')]
        prefix = archive.namelist()[0].split('/')[0]
    # 96 copies of one fully flushed deflate block of 16 MiB of zeros (each block is
    # self-contained), then an empty final block: a valid stream of 1.5 GiB.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(16 << 20)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    copies = 96
    stream = block * copies + b'\x03\x00'
    crc = 0
    for _ in range(copies):
        crc = zlib.crc32(chunk, crc)
    entries = [(f'{prefix}/data.pkl', stream, zipfile.ZIP_DEFLATED, crc, copies * len(chunk))]
    entries += [(name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data))
                for name, data in others]
    bomb = tmp_path / 'bomb.ckpt'
    _write_zip(bomb, entries)
    assert bomb.stat().st_size < 4 * 2**20  # ~400x
    with zipfile.ZipFile(bomb) as archive:  # a well-formed archive, as the probe's was
        assert archive.getinfo(f'{prefix}/data.pkl').file_size == 1536 * 2**20
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = import_in_subprocess(bomb, tmp_path / 'out', timeout=120)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count('\n') == 1 and 'refusing a zip bomb' in result.stderr
    assert 'data.pkl' in result.stderr and str(bomb) in result.stderr
    assert seconds < 60
    assert max(peak_kib, before) < 1.5 * 2**20  # KiB: far below the 1.5 GiB it would inflate to


def test_garbage_checkpoints_say_what_is_wrong(tmp_path, tiny, capsys):
    """Garbage once said "(184)": the number of an unknown pickle opcode."""
    config, tensors = tiny
    random_bytes = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    garbage = tmp_path / 'garbage.ckpt'
    garbage.write_bytes(b'\xb8' + random_bytes)
    code, out, err = run_cli(capsys, garbage, tmp_path / 'out')
    assert code == 2 and err.count('\n') == 1
    assert 'neither a zip archive nor a pickle' in err and "starts with b'\\xb8" in err

    damaged = tmp_path / 'damaged.ckpt'
    torch.save({'state_dict': lidiff_state(tensors)}, damaged)
    rewrite_records(damaged, lambda name, data: b'\x80\x02\xb8' + random_bytes
                    if name.endswith('data.pkl') else data)
    code, out, err = run_cli(capsys, damaged, tmp_path / 'out')
    assert code == 2 and err.count('\n') == 1
    assert 'an unknown pickle opcode 0xb8' in err and '(184)' not in err


def test_tensor_records_are_checked_against_the_archive(tmp_path, tiny, capsys):
    """The pickle's storage sizes must be the archive's real record sizes (checked before torch
    allocates or maps anything), and every tensor view must lie inside its storage."""
    config, tensors = tiny
    path = tmp_path / 'short.ckpt'
    torch.save({'state_dict': lidiff_state(tensors)}, path)
    rewrite_records(path, lambda name, data: data[:len(data) // 2] if name.endswith('/data/0')
                    else data)
    code, _, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and err.count('\n') == 1
    assert re.search(r'tensor record data/0 holds \d+ bytes, the pickle declares \d+', err)

    class OversizedView:
        def __reduce__(self):
            storage = torch.zeros(4)._typed_storage()
            return torch._utils._rebuild_tensor_v2, (storage, 0, (1000, 1000), (1000, 1), False,
                                                    OrderedDict())

    path = tmp_path / 'view.ckpt'
    torch.save({'state_dict': {**lidiff_state(tensors), 'model.extra': OversizedView()}}, path)
    code, _, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and err.count('\n') == 1
    assert 'a tensor of shape (1000, 1000) reaching past its storage of 4 values' in err


def test_real_state_dicts_with_module_metadata_import(tmp_path, tiny):
    """`module.state_dict()` carries `_metadata` (pickled as a BUILD on the OrderedDict), which
    the restricted unpickler refused before: real checkpoints hold such state dicts."""
    from distdpo_ros.models import DiffusionNet

    config = preset('tiny', 'teacher')
    torch.manual_seed(0)
    net = DiffusionNet(config)
    state = net.state_dict()
    assert hasattr(state, '_metadata')
    lightning_state = OrderedDict(
        (('model.' + k.removeprefix('denoiser.') if k.startswith('denoiser.')
          else 'partial_enc.' + k.removeprefix('encoder.')), v) for k, v in state.items())
    lightning_state._metadata = state._metadata
    path = tmp_path / 'real.ckpt'
    torch.save({'state_dict': lightning_state, 'epoch': 3}, path)
    imported_config, imported = lightning.import_lightning_checkpoint(path)
    assert_same_tensors(imported, dict(state))


@pytest.mark.parametrize('section, key, value, message', [
    ('data', 'num_points', 10**15, r'num_points \(/ 10 = scan_points\) must be <= 1000000'),
    ('data', 'num_points', 200.5, r'num_points \(/ 10 = scan_points\) must be a whole number'),
    ('diff', 't_steps', 10**12, 't_steps must be <= 100000'),
    ('data', 'resolution', 1e-30, 'resolution must be >= 0.001'),
    ('data', 'max_range', float('nan'), 'max_range must be a finite number'),
    ('train', 'uncond_w', 'six', "uncond_w must be a number, got 'six'"),
])
def test_hyper_parameters_are_checked_by_type_and_range(tmp_path, tiny, capsys, section, key,
                                                        value, message):
    config, tensors = tiny
    hparams = {**LIDIFF_HPARAMS, section: {**LIDIFF_HPARAMS[section], key: value}}
    path = save_lightning_style(tmp_path / 'in.ckpt', lidiff_state(tensors), hparams)
    code, out, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and out == '' and err.count('\n') == 1
    assert re.search(rf'{re.escape(str(path))}: hyper_parameters\.{section}\.{message}', err), err
    assert not (tmp_path / 'out').exists()


def test_exponential_bookkeeping_is_refused_quickly(tmp_path, tiny, capsys):
    """A pickle can share one list many times: 10 references, 20 levels deep, is a small file
    describing 10**20 values. Copying it into the provenance notes must not try."""
    config, tensors = tiny
    shared: list = [0] * 10
    for _ in range(20):
        shared = [shared] * 10
    path = save_lightning_style(tmp_path / 'laughs.ckpt', lidiff_state(tensors),
                                {**LIDIFF_HPARAMS, 'experiment': {'id': shared}})
    assert path.stat().st_size < 10 * 2**20
    started = time.perf_counter()
    code, _, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and err.count('\n') == 1
    assert "its 'hyper_parameters' holds more than 100,000 values" in err
    assert time.perf_counter() - started < 30


def test_nan_weights_are_refused_on_import_and_load(tmp_path, tiny, capsys):
    """NaN weights once imported and completed every scan into an empty cloud with exit 0."""
    config, tensors = tiny
    state = lidiff_state(tensors)
    state['model.stem.0.kernel'] = state['model.stem.0.kernel'].clone()
    state['model.stem.0.kernel'][0, 0, 0] = float('nan')
    path = save_lightning_style(tmp_path / 'nan.ckpt', state, LIDIFF_HPARAMS)
    code, _, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 2 and err.count('\n') == 1
    assert "tensor 'denoiser.stem.0.kernel' holds 1 NaN or infinite value(s)" in err
    out = ckpt.save_checkpoint(tmp_path / 'm', config, tensors)
    bad = dict(tensors)
    bad['encoder.stem.0.kernel'] = torch.full_like(bad['encoder.stem.0.kernel'], float('inf'))
    safetensors.torch.save_file(bad, out / ckpt.WEIGHTS_FILE)  # no digest: a foreign writer
    with pytest.raises(UserError, match=r"weights\.safetensors: tensor 'encoder\.stem\.0\.kernel'"
                                        r' holds \d+ NaN or infinite'):
        ckpt.load_checkpoint(out)
