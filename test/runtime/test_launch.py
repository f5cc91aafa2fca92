"""The launch file and RViz config: documented arguments, consistent names, loadable files."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / 'launch' / 'complete.launch.py'
DOCUMENTED = {'model', 'device', 'steps', 'input_topic', 'use_sim_time', 'rviz', 'bag'}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, 'id', getattr(n.func, 'attr', None)) == name]


def _keyword(call: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


@pytest.fixture(scope='module')
def tree() -> ast.Module:
    source = LAUNCH_FILE.read_text()
    compile(source, str(LAUNCH_FILE), 'exec')
    return ast.parse(source)


def test_launch_file_declares_the_documented_arguments(tree):
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert 'generate_launch_description' in functions
    declared = {ast.literal_eval(c.args[0]) for c in _calls(tree, 'DeclareLaunchArgument')}
    assert DOCUMENTED <= declared
    for call in _calls(tree, 'DeclareLaunchArgument'):
        assert _keyword(call, 'description'), ast.literal_eval(call.args[0])


def test_launch_file_starts_our_node_rviz_and_a_bag_with_large_data(tree):
    from distdpo_ros import node

    nodes = _calls(tree, 'Node')
    ours = [c for c in nodes if _keyword(c, 'executable') == 'completion_node']
    assert len(ours) == 1 and _keyword(ours[0], 'name') == node.NODE_NAME
    setup = (REPO / 'setup.py').read_text()
    assert "'completion_node = distdpo_ros.node:main'" in setup
    remap = next(k.value for k in ours[0].keywords if k.arg == 'remappings')
    assert ast.literal_eval(remap.elts[0].elts[0]) == node.INPUT_TOPIC
    assert any(_keyword(c, 'executable') == 'rviz2' for c in nodes)
    env = _calls(tree, 'SetEnvironmentVariable')
    assert [ast.literal_eval(c.args[0]) for c in env] == ['FASTDDS_BUILTIN_TRANSPORTS']
    assert 'LARGE_DATA' in ast.unparse(env[0])
    commands = [ast.unparse(c) for c in _calls(tree, 'ExecuteProcess')]
    assert commands and all("'ros2', 'bag', 'play'" in c for c in commands)
    joined = [ast.literal_eval(c.args[0].elts[-1]) for c in _calls(tree, 'PathJoinSubstitution')]
    referenced = {name for name in joined if name.endswith(('.yaml', '.rviz'))}
    assert referenced == {'completion.yaml', 'distdpo.rviz'}
    for name in referenced:
        assert (REPO / 'config' / name).is_file()


def test_launch_description_builds_when_launch_is_installed():
    pytest.importorskip('launch', reason='the launch package is not on PyPI; ast checks above')
    pytest.importorskip('launch_ros')
    spec = importlib.util.spec_from_file_location('complete_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert DOCUMENTED <= {a.name for a in description.get_launch_arguments()}


def test_rviz_config_shows_both_clouds_in_the_velodyne_frame():
    config = yaml.safe_load((REPO / 'config' / 'distdpo.rviz').read_text())
    manager = config['Visualization Manager']
    assert manager['Global Options']['Fixed Frame'] == 'velodyne'
    clouds = {d['Topic']['Value']: d for d in manager['Displays']
              if d['Class'] == 'rviz_default_plugins/PointCloud2'}
    assert set(clouds) == {'/velodyne_points', '/distdpo/completed_points'}
    assert clouds['/velodyne_points']['Topic']['Reliability Policy'] == 'Best Effort'
    for display in clouds.values():
        assert display['Enabled'] and 0 < display['Size (Pixels)'] <= 4
    assert clouds['/distdpo/completed_points']['Color Transformer'] == 'AxisColor'
