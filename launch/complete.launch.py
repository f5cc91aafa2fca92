"""Launch the distdpo_completion node, optionally with RViz2 and a bag playing into it.

    ros2 launch distdpo_ros complete.launch.py                       # a Velodyne driver is running
    ros2 launch distdpo_ros complete.launch.py bag:=drive.mcap rviz:=true use_sim_time:=true
    ros2 launch distdpo_ros complete.launch.py model:=/path/to/student device:=cuda steps:=4

Sets FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (unless already set) for every process it starts:
default Fast DDS loses most 2.6 MB clouds sent best effort (fragment loss). Processes you start
elsewhere (a driver, `ros2 bag play`) need the same variable.

RViz gets a copy of config/distdpo.rviz showing `input_topic` and `output_topic`. With `bag:=`,
the launch stops with an error (exit code 1) when `ros2 bag` is not installed or the player fails;
when the bag has played to its end the node keeps running.
"""

from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessExit
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from distdpo_ros.launch_support import bag_play_command, bag_player_problem, write_rviz_config

PACKAGE = 'distdpo_ros'


def _sim_time(context) -> bool:
    return LaunchConfiguration('use_sim_time').perform(context).lower() == 'true'


def _rviz(context):
    """RViz2 with the shipped view, its cloud displays on the topics in use."""
    template = PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', 'distdpo.rviz'])
    config = write_rviz_config(template.perform(context),
                               LaunchConfiguration('input_topic').perform(context),
                               LaunchConfiguration('output_topic').perform(context))
    return [Node(package='rviz2', executable='rviz2', name='rviz2', output='log',
                 arguments=['-d', str(config)],
                 parameters=[{'use_sim_time': _sim_time(context)}])]


def _check_bag(context):
    """Stop the launch, before anything starts, when `bag:=` cannot be played."""
    bag = LaunchConfiguration('bag').perform(context)
    problem = bag_player_problem(bag) if bag else None
    if problem:
        raise RuntimeError(problem)
    return []


def _bag(context):
    """`ros2 bag play BAG` (with --clock under use_sim_time), after the node has started."""
    bag = LaunchConfiguration('bag').perform(context)
    if not bag:
        return []
    player = ExecuteProcess(cmd=bag_play_command(bag, _sim_time(context)), name='ros2_bag_play',
                            output='screen')
    return [player, RegisterEventHandler(OnProcessExit(target_action=player,
                                                       on_exit=_player_exited))]


def _player_exited(event, context):
    if context.is_shutdown:
        return []
    if event.returncode == 0:
        return [LogInfo(msg='the bag has played to its end; the completion node keeps running '
                            '(Ctrl-C stops it)')]
    raise RuntimeError(f'ros2 bag play failed with exit code {event.returncode} (its output is '
                       'above); stopping the launch')


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    sim_time = ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)
    return LaunchDescription([
        DeclareLaunchArgument('model', default_value='default',
                              description='checkpoint directory, or a shipped model name'),
        DeclareLaunchArgument('device', default_value='auto',
                              description='auto (cuda when available), cpu, cuda or cuda:N'),
        DeclareLaunchArgument('steps', default_value='0',
                              description="sampler steps per scan, 0: the model's own (also "
                                          'settable at run time)'),
        DeclareLaunchArgument('input_topic', default_value='/velodyne_points',
                              description='PointCloud2 topic to complete'),
        DeclareLaunchArgument('output_topic', default_value='/distdpo/completed_points',
                              description='topic of the completed clouds'),
        DeclareLaunchArgument('use_sim_time', default_value='false', choices=['true', 'false'],
                              description='use /clock (set true when playing a bag)'),
        DeclareLaunchArgument('rviz', default_value='false', choices=['true', 'false'],
                              description='start RViz2 with config/distdpo.rviz on the input '
                                          'and output topics'),
        DeclareLaunchArgument('bag', default_value='',
                              description='rosbag2 to play with `ros2 bag play` (empty: none; '
                                          'needs ros2bag and rosbag2_storage_mcap)'),
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([share, 'config',
                                                                  'completion.yaml']),
                              description='node parameters (ros__parameters YAML)'),
        OpaqueFunction(function=_check_bag),
        SetEnvironmentVariable('FASTDDS_BUILTIN_TRANSPORTS',
                               EnvironmentVariable('FASTDDS_BUILTIN_TRANSPORTS',
                                                   default_value='LARGE_DATA')),
        Node(
            package=PACKAGE, executable='completion_node', name='distdpo_completion',
            output='screen', emulate_tty=True,
            parameters=[LaunchConfiguration('params_file'),
                        {'model': LaunchConfiguration('model'),
                         'device': LaunchConfiguration('device'),
                         'steps': ParameterValue(LaunchConfiguration('steps'), value_type=int),
                         'use_sim_time': sim_time}],
            remappings=[('/velodyne_points', LaunchConfiguration('input_topic')),
                        ('/distdpo/completed_points', LaunchConfiguration('output_topic'))]),
        OpaqueFunction(function=_rviz, condition=IfCondition(LaunchConfiguration('rviz'))),
        OpaqueFunction(function=_bag),
    ])
