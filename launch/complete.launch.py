"""Launch the distdpo_completion node, optionally with RViz2 and a bag playing into it.

    ros2 launch distdpo_ros complete.launch.py                       # a Velodyne driver is running
    ros2 launch distdpo_ros complete.launch.py bag:=drive.mcap rviz:=true use_sim_time:=true
    ros2 launch distdpo_ros complete.launch.py model:=/path/to/student device:=cuda steps:=4

Sets FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (unless already set) for every process it starts:
with best-effort QoS, default Fast DDS loses most 2.6 MB Velodyne clouds to fragment loss.
Processes you start elsewhere (a driver, `ros2 bag play`) need the same variable.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import (
    EnvironmentVariable,
    LaunchConfiguration,
    PathJoinSubstitution,
    PythonExpression,
)
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'distdpo_ros'


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    model = LaunchConfiguration('model')
    device = LaunchConfiguration('device')
    steps = LaunchConfiguration('steps')
    input_topic = LaunchConfiguration('input_topic')
    use_sim_time = LaunchConfiguration('use_sim_time')
    rviz = LaunchConfiguration('rviz')
    bag = LaunchConfiguration('bag')
    params_file = LaunchConfiguration('params_file')
    sim_time = ParameterValue(use_sim_time, value_type=bool)
    bag_with_clock = PythonExpression(["'", bag, "' != '' and '", use_sim_time,
                                       "'.lower() == 'true'"])
    bag_without_clock = PythonExpression(["'", bag, "' != '' and '", use_sim_time,
                                          "'.lower() != 'true'"])
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
        DeclareLaunchArgument('use_sim_time', default_value='false', choices=['true', 'false'],
                              description='use /clock (set true when playing a bag)'),
        DeclareLaunchArgument('rviz', default_value='false', choices=['true', 'false'],
                              description='start RViz2 with config/distdpo.rviz'),
        DeclareLaunchArgument('bag', default_value='',
                              description='rosbag2 to play with `ros2 bag play` (empty: none)'),
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([share, 'config',
                                                                  'completion.yaml']),
                              description='node parameters (ros__parameters YAML)'),
        SetEnvironmentVariable('FASTDDS_BUILTIN_TRANSPORTS',
                               EnvironmentVariable('FASTDDS_BUILTIN_TRANSPORTS',
                                                   default_value='LARGE_DATA')),
        Node(
            package=PACKAGE, executable='completion_node', name='distdpo_completion',
            output='screen', emulate_tty=True,
            parameters=[params_file, {'model': model, 'device': device,
                                      'steps': ParameterValue(steps, value_type=int),
                                      'use_sim_time': sim_time}],
            remappings=[('/velodyne_points', input_topic)]),
        Node(
            package='rviz2', executable='rviz2', name='rviz2', output='log',
            arguments=['-d', PathJoinSubstitution([share, 'config', 'distdpo.rviz'])],
            parameters=[{'use_sim_time': sim_time}],
            condition=IfCondition(rviz)),
        ExecuteProcess(cmd=['ros2', 'bag', 'play', bag, '--clock'], output='screen',
                       condition=IfCondition(bag_with_clock)),
        ExecuteProcess(cmd=['ros2', 'bag', 'play', bag], output='screen',
                       condition=IfCondition(bag_without_clock)),
    ])
