"""The package as ROS 2 sees it: launch file, RViz config, bag checks, package.xml, the venv's
ament index (`make ros-index`) and colcon builds (when colcon is installed)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from distdpo_ros import launch_support
from distdpo_ros.node_support import INPUT_TOPIC, NODE_NAME, OUTPUT_TOPIC, PARAMETERS

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / 'launch' / 'complete.launch.py'
DOCUMENTED = {'model', 'device', 'steps', 'input_topic', 'output_topic', 'use_sim_time', 'rviz',
              'bag'}


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
    readme = (REPO / 'README.md').read_text()
    for name in DOCUMENTED - {'model', 'device', 'steps'}:
        assert f'{name}:=' in readme, name


def test_launch_file_starts_our_node_with_both_topics_remapped_and_large_data(tree):
    nodes = _calls(tree, 'Node')
    ours = [c for c in nodes if _keyword(c, 'executable') == 'completion_node']
    assert len(ours) == 1 and _keyword(ours[0], 'name') == NODE_NAME
    assert "'completion_node = distdpo_ros.node:main'" in (REPO / 'setup.py').read_text()
    remap = next(k.value for k in ours[0].keywords if k.arg == 'remappings')
    assert [ast.literal_eval(pair.elts[0]) for pair in remap.elts] == [INPUT_TOPIC, OUTPUT_TOPIC]
    assert [ast.unparse(pair.elts[1]) for pair in remap.elts] == [
        "LaunchConfiguration('input_topic')", "LaunchConfiguration('output_topic')"]
    assert any(_keyword(c, 'executable') == 'rviz2' for c in nodes)
    env = _calls(tree, 'SetEnvironmentVariable')
    assert [ast.literal_eval(c.args[0]) for c in env] == ['FASTDDS_BUILTIN_TRANSPORTS']
    assert 'LARGE_DATA' in ast.unparse(env[0])
    joined = [ast.literal_eval(c.args[0].elts[-1]) for c in _calls(tree, 'PathJoinSubstitution')]
    referenced = {name for name in joined if name.endswith(('.yaml', '.rviz'))}
    assert referenced == {'completion.yaml', 'distdpo.rviz'}
    for name in referenced:
        assert (REPO / 'config' / name).is_file()


def test_rviz_config_shows_both_clouds_in_the_velodyne_frame():
    config = yaml.safe_load((REPO / 'config' / 'distdpo.rviz').read_text())
    manager = config['Visualization Manager']
    assert manager['Global Options']['Fixed Frame'] == 'velodyne'
    clouds = {d['Topic']['Value']: d for d in manager['Displays']
              if d['Class'] == 'rviz_default_plugins/PointCloud2'}
    assert set(clouds) == {INPUT_TOPIC, OUTPUT_TOPIC}
    assert clouds[INPUT_TOPIC]['Topic']['Reliability Policy'] == 'Best Effort'
    for display in clouds.values():
        assert display['Enabled'] and 0 < display['Size (Pixels)'] <= 4
    assert clouds[OUTPUT_TOPIC]['Color Transformer'] == 'AxisColor'


def test_rviz_config_follows_the_input_and_output_topics(tmp_path):
    path = launch_support.write_rviz_config(REPO / 'config' / 'distdpo.rviz', 'lidar/points',
                                            '/completed')
    try:
        config = yaml.safe_load(path.read_text())
    finally:
        path.unlink()
    template = yaml.safe_load((REPO / 'config' / 'distdpo.rviz').read_text())
    clouds = [d for d in config['Visualization Manager']['Displays']
              if d['Class'] == 'rviz_default_plugins/PointCloud2']
    assert [d['Topic']['Value'] for d in clouds] == ['/lidar/points', '/completed']
    assert [d['Name'] for d in clouds] == ['Input scan (/lidar/points)',
                                           'Completed scene (/completed)']
    for display in clouds:  # nothing else changed
        display['Topic']['Value'] = display['Name'] = None
    for display in template['Visualization Manager']['Displays']:
        if display['Class'] == 'rviz_default_plugins/PointCloud2':
            display['Topic']['Value'] = display['Name'] = None
    assert config == template
    with pytest.raises(ValueError, match='no display of /distdpo/completed_points'):
        launch_support.rviz_config('Visualization Manager:\n  Displays:\n    - Topic:\n'
                                   '        Value: /velodyne_points\n', 'a', 'b')


def test_a_bag_without_ros2_bag_is_refused_with_what_to_install(tmp_path):
    bag = tmp_path / 'drive.mcap'
    assert 'no such file' in launch_support.bag_player_problem(str(bag))
    bag.touch()
    problem = launch_support.bag_player_problem(str(bag), path=str(tmp_path))  # no ros2 there
    assert 'the ros2 command' in problem and 'ros2bag and rosbag2_storage_mcap' in problem
    assert f'distdpo replay {bag}' in problem
    fake = tmp_path / 'ros2'
    fake.write_text('#!/bin/sh\n')
    fake.chmod(0o755)
    has_ros2bag = importlib.util.find_spec('ros2bag') is not None
    assert (launch_support.bag_player_problem(str(bag), path=str(tmp_path)) is None) == has_ros2bag
    assert launch_support.bag_play_command(str(bag), clock=True) == [
        'ros2', 'bag', 'play', str(bag), '--clock']
    assert launch_support.bag_play_command(str(bag), clock=False)[-1] == str(bag)


def test_launch_description_builds_when_launch_is_installed():
    pytest.importorskip('launch', reason='the launch package is not on PyPI; ast checks above')
    pytest.importorskip('launch_ros')
    spec = importlib.util.spec_from_file_location('complete_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert DOCUMENTED <= {a.name for a in description.get_launch_arguments()}


# ---- package.xml, README ---------------------------------------------------------------------

# setup.py's install_requires and the rosdep key of each; None: no key exists (README step)
ROSDEP_KEYS = {'numpy': 'python3-numpy', 'torch': 'python3-torch', 'safetensors': None,
               'scipy': 'python3-scipy', 'pyyaml': 'python3-yaml', 'tqdm': 'python3-tqdm'}


def _requirements() -> list[str]:
    tree = ast.parse((REPO / 'setup.py').read_text())
    call = next(c for c in _calls(tree, 'setup'))
    requires = next(k.value for k in call.keywords if k.arg == 'install_requires')
    return [re.split('[<>=!~ ]', ast.literal_eval(e))[0].lower() for e in requires.elts]


def test_package_xml_declares_every_runtime_dependency_rosdep_knows():
    root = ET.parse(REPO / 'package.xml').getroot()
    assert root.get('format') == '3' and root.findtext('name') == 'distdpo_ros'
    assert root.find('export/build_type').text == 'ament_python'
    exec_depends = {e.text for e in root.iter('exec_depend')}
    assert set(_requirements()) == set(ROSDEP_KEYS)
    assert {k for k in ROSDEP_KEYS.values() if k} <= exec_depends
    # what the launch file starts or imports
    assert {'rclpy', 'sensor_msgs', 'diagnostic_msgs', 'launch', 'launch_ros', 'rviz2',
            'ros2bag', 'rosbag2_storage_mcap', 'ament_index_python'} <= exec_depends
    from distdpo_ros.node_support import PIP_STEP

    assert PIP_STEP in (REPO / 'README.md').read_text()  # what rosdep cannot install


def test_node_names_a_missing_or_old_torch_and_safetensors_with_the_readme_step(monkeypatch):
    from importlib import metadata

    from distdpo_ros.errors import UserError
    from distdpo_ros.node_support import check_runtime_dependencies

    check_runtime_dependencies()  # this venv has both
    versions = {'torch': '1.13.1'}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, 'version', version)
    with pytest.raises(UserError) as error:
        check_runtime_dependencies()
    message = str(error.value)
    assert 'torch 1.13.1 is older than 2.1' in message
    assert 'safetensors is not installed' in message
    assert 'python3 -m pip install "torch>=2.1" "safetensors>=0.4"' in message  # = PIP_STEP
    versions.update(torch='2.13.0+cpu', safetensors='0.6.2')
    check_runtime_dependencies()


def test_readme_parameter_table_matches_the_node():
    """Every parameter, its default and whether it changes at run time, as the node declares."""
    section = (REPO / 'README.md').read_text().split('## The ROS 2 node')[1].split('\n## ')[0]
    rows = re.findall(r'^\| `(\w+)` \| `([^`]*)` \| (yes|no) \|', section, re.MULTILINE)
    assert [name for name, _, _ in rows] == list(PARAMETERS)
    for name, default, writable in rows:
        spec = PARAMETERS[name]
        shown = str(spec.default).lower() if isinstance(spec.default, bool) else str(spec.default)
        assert default == shown, name
        assert (writable == 'yes') == (not spec.read_only), name


# ---- the venv's ament index, colcon -----------------------------------------------------------

def test_make_ros_index_lets_ament_find_the_package(tmp_path, monkeypatch):
    if shutil.which('make') is None:
        pytest.skip('make is not installed')
    packages = pytest.importorskip('ament_index_python.packages')
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    (venv / 'bin' / 'activate').write_text('')
    subprocess.run(['make', '-s', '-C', str(REPO), 'ros-index', f'VENV={venv}'], check=True)
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(venv))
    share = Path(packages.get_package_share_directory('distdpo_ros'))
    assert share == venv / 'share' / 'distdpo_ros'
    for name in ('launch/complete.launch.py', 'config/completion.yaml', 'config/distdpo.rviz',
                 'package.xml'):
        assert (share / name).resolve() == (REPO / name).resolve(), name
    assert not (share / 'launch').is_symlink()  # ros2 launch walks it without following links
    assert os.readlink(venv / 'lib' / 'distdpo_ros' / 'completion_node') == \
        '../../bin/completion_node'
    script = subprocess.run(['bash', '-c', f'. {venv}/setup.bash; . {venv}/setup.bash; '
                             'echo "$AMENT_PREFIX_PATH"'], capture_output=True, text=True,
                            env={'PATH': os.environ['PATH'], 'AMENT_PREFIX_PATH': '/opt/ros/x'})
    assert script.stdout.strip() == f'{venv}:/opt/ros/x'


def _package_files() -> list[str]:
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                            cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip('not a git checkout: cannot tell the package files')
    return [f for f in listed.stdout.splitlines() if (REPO / f).is_file()]


@pytest.fixture(scope='module')
def colcon_workspace(tmp_path_factory) -> Path:
    """A workspace with a copy of the package (what git tracks, plus new files)."""
    if shutil.which('colcon', path=str(Path(sys.executable).parent) + os.pathsep
                    + os.environ.get('PATH', '')) is None:
        pytest.skip('colcon is not installed (pip install colcon-common-extensions)')
    ws = tmp_path_factory.mktemp('ws')
    for name in _package_files():
        target = ws / 'src' / 'distdpo_ros' / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return ws


@pytest.mark.parametrize('symlink', [True, False], ids=['symlink-install', 'install'])
def test_colcon_build_installs_a_package_ros2_finds(colcon_workspace, symlink):
    ws = colcon_workspace
    build, install = f'build-{symlink}', f'install-{symlink}'
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ['PATH'])
    command = ['colcon', '--log-base', f'log-{symlink}', 'build', '--build-base', build,
               '--install-base', install, '--event-handlers', 'console_direct-']
    result = subprocess.run(command + (['--symlink-install'] if symlink else []), cwd=ws, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stderr = (ws / f'log-{symlink}' / 'latest_build' / 'distdpo_ros' / 'stderr.log').read_text()
    warnings = [line for line in stderr.splitlines() if 'warn' in line.lower()
                and 'byte-compiling is disabled' not in line]  # PYTHONDONTWRITEBYTECODE
    assert not warnings, stderr[-3000:]
    prefix = ws / install / 'distdpo_ros'
    assert (prefix / 'share/ament_index/resource_index/packages/distdpo_ros').is_file()
    launch_file = prefix / 'share/distdpo_ros/launch/complete.launch.py'
    assert launch_file.is_symlink() == symlink
    assert launch_file.read_text() == LAUNCH_FILE.read_text()
    assert os.access(prefix / 'lib/distdpo_ros/completion_node', os.X_OK)
    probe = ('import distdpo_ros, distdpo_training; '
             'from ament_index_python.packages import get_package_share_directory as share; '
             'print(distdpo_ros.__file__); print(distdpo_training.__file__); '
             "print(share('distdpo_ros'))")
    sourced = subprocess.run(
        ['bash', '-c', f'. {ws / install}/setup.bash && cd / && {sys.executable} -c "{probe}"'],
        env=dict(env, AMENT_PREFIX_PATH=sys.prefix), capture_output=True, text=True, timeout=120)
    assert sourced.returncode == 0, sourced.stderr[-3000:]
    ros_file, training_file, share = sourced.stdout.split()
    assert ros_file.startswith(str(ws)) and training_file.startswith(str(ws)), sourced.stdout
    assert share == str(prefix / 'share' / 'distdpo_ros')
    if symlink:  # an edit in the source shows through at once
        assert Path(ros_file).resolve().is_relative_to(ws / 'src' / 'distdpo_ros')
