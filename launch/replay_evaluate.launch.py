"""Replay a rosbag2 into the segment node, or score the node on the bag.

Replay and look (RViz on the output topic):
    ros2 launch cmkd_ros replay_evaluate.launch.py bag:=drive.mcap checkpoint:=student.pt
Score it (mIoU against /lidar/labels, latency, drops; JSON report):
    ros2 launch cmkd_ros replay_evaluate.launch.py bag:=drive.mcap checkpoint:=student.pt \
        evaluate:=true json:=report.json
"""
import os

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, OpaqueFunction,
                            RegisterEventHandler, SetEnvironmentVariable)
from launch.conditions import IfCondition, UnlessCondition
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import FindExecutable, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def _fastdds_profile(context):
    """Point Fast DDS (2.x reads FASTRTPS_..., 3.x FASTDDS_...) at the chosen profile."""
    profile = LaunchConfiguration('fastdds_profile').perform(context)
    if not profile:
        return []
    old = os.environ.get('ROS_DISTRO', '') in ('humble', 'iron')
    var = 'FASTRTPS_DEFAULT_PROFILES_FILE' if old else 'FASTDDS_DEFAULT_PROFILES_FILE'
    return [SetEnvironmentVariable(var, profile)]


def generate_launch_description():
    share = FindPackageShare('cmkd_ros')
    evaluate = LaunchConfiguration('evaluate')
    arguments = [
        DeclareLaunchArgument('bag', description='rosbag2 folder or file (MCAP or sqlite3)'),
        DeclareLaunchArgument('checkpoint', description='student checkpoint (.pt)'),
        DeclareLaunchArgument(
            'params_file', description='segment node parameters (ros__parameters YAML)',
            default_value=PathJoinSubstitution([share, 'config', 'segment_node.param.yaml'])),
        DeclareLaunchArgument('device', default_value='cpu',
                              description='torch device: cpu, cuda or cuda:N'),
        DeclareLaunchArgument('precision', default_value='auto',
                              description='inference arithmetic: float32, bfloat16 (faster on '
                              'CPUs with AVX512-BF16/AMX), float16 (CUDA) or auto (bfloat16 '
                              'where the CPU has it, else float32)'),
        DeclareLaunchArgument('rate', default_value='1.0', description='playback speed factor'),
        DeclareLaunchArgument('use_sim_time', default_value='true',
                              description='segment node follows the replayed /clock'),
        DeclareLaunchArgument('input_pointcloud', default_value='/lidar/points',
                              description='LiDAR topic in the bag'),
        DeclareLaunchArgument('output_pointcloud', default_value='/lidar/points_labeled',
                              description='labeled PointCloud2 topic'),
        DeclareLaunchArgument('evaluate', default_value='false',
                              description='true: run cmkd evaluate-bag (it starts its own '
                              'segment node) and print mIoU, latency and drops'),
        DeclareLaunchArgument('json', default_value='evaluation.json',
                              description='evaluate:=true writes its report here'),
        DeclareLaunchArgument(
            'fastdds_profile', description='Fast DDS profile enlarging shared memory',
            default_value=PathJoinSubstitution([share, 'config', 'fastdds_shm.xml'])),
    ]
    node = Node(
        package='cmkd_ros', executable='segment_node', name='segment_node', output='screen',
        condition=UnlessCondition(evaluate),
        parameters=[LaunchConfiguration('params_file'), {
            'checkpoint': ParameterValue(LaunchConfiguration('checkpoint'), value_type=str),
            'device': ParameterValue(LaunchConfiguration('device'), value_type=str),
            'precision': ParameterValue(LaunchConfiguration('precision'), value_type=str),
            'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'),
                                           value_type=bool),
        }],
        remappings=[('~/input/pointcloud', LaunchConfiguration('input_pointcloud')),
                    ('~/output/pointcloud', LaunchConfiguration('output_pointcloud'))])
    # `python3 -m cmkd_ros.cli`: colcon puts the `cmkd` script in lib/cmkd_ros, off the PATH.
    python = FindExecutable(name='python3')
    replay = ExecuteProcess(
        cmd=[python, '-m', 'cmkd_ros.cli', 'replay', LaunchConfiguration('bag'), '--clock',
             '--rate', LaunchConfiguration('rate'),
             '--wait-for', LaunchConfiguration('input_pointcloud')],
        output='screen', condition=UnlessCondition(evaluate))
    score = ExecuteProcess(
        cmd=[python, '-m', 'cmkd_ros.cli', 'evaluate-bag', LaunchConfiguration('bag'),
             '--checkpoint', LaunchConfiguration('checkpoint'),
             '--params-file', LaunchConfiguration('params_file'),
             '--device', LaunchConfiguration('device'),
             '--precision', LaunchConfiguration('precision'),
             '--rate', LaunchConfiguration('rate'),
             '--points-topic', LaunchConfiguration('input_pointcloud'),
             '--json', LaunchConfiguration('json')],
        output='screen', condition=IfCondition(evaluate))
    stop_after = [RegisterEventHandler(OnProcessExit(target_action=action,
                                                     on_exit=[EmitEvent(event=Shutdown())]))
                  for action in (replay, score)]
    return LaunchDescription(arguments + [OpaqueFunction(function=_fastdds_profile), node,
                                          replay, score] + stop_after)
