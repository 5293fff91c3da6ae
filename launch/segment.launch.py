"""Segment node: label a LiDAR cloud with a student checkpoint.

    ros2 launch cmkd_ros segment.launch.py checkpoint:=/path/student.pt \
        input_pointcloud:=/lidar/points output_pointcloud:=/lidar/points_labeled
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from cmkd_ros.nodes.launch_support import (fail_launch_if_exits_with_error, fastdds_profile,
                                     optional_parameters, reject_unknown_arguments)

# Launch arguments passed to the node only when given: empty keeps the params file's value.
OPTIONAL_PARAMETERS = {'device': ('device', str), 'precision': ('precision', str)}


def _segment_node(context):
    node = Node(
        package='cmkd_ros', executable='segment_node', name='segment_node', output='screen',
        parameters=[LaunchConfiguration('params_file'), {
            'checkpoint': ParameterValue(LaunchConfiguration('checkpoint'), value_type=str),
            'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'),
                                           value_type=bool),
        }, optional_parameters(context, OPTIONAL_PARAMETERS)],
        remappings=[('~/input/pointcloud', LaunchConfiguration('input_pointcloud')),
                    ('~/output/pointcloud', LaunchConfiguration('output_pointcloud'))])
    return [node, fail_launch_if_exits_with_error(node)]


def generate_launch_description():
    share = FindPackageShare('cmkd_ros')
    arguments = [
        DeclareLaunchArgument('checkpoint', description='student checkpoint (.pt) to run'),
        DeclareLaunchArgument(
            'params_file', description='segment node parameters (ros__parameters YAML)',
            default_value=PathJoinSubstitution([share, 'config', 'segment_node.param.yaml'])),
        DeclareLaunchArgument('device', default_value='',
                              description="torch device: cpu, cuda or cuda:N ('': the "
                              "params file's, default cpu)"),
        DeclareLaunchArgument('precision', default_value='',
                              description='inference arithmetic: float32, bfloat16 (faster on '
                              'CPUs with AVX512-BF16/AMX), float16 (CUDA) or auto (bfloat16 '
                              "where the CPU has it, else float32); '': the params file's, "
                              'default auto'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='use /clock (true when replaying a bag)'),
        DeclareLaunchArgument('input_pointcloud', default_value='/lidar/points',
                              description='LiDAR PointCloud2 topic to segment'),
        DeclareLaunchArgument('output_pointcloud', default_value='/lidar/points_labeled',
                              description='labeled PointCloud2 topic'),
        DeclareLaunchArgument(
            'fastdds_profile', description='Fast DDS profile enlarging shared memory for large '
            "clouds ('' keeps the environment's)",
            default_value=PathJoinSubstitution([share, 'config', 'fastdds_shm.xml'])),
    ]
    return LaunchDescription(arguments + [
        reject_unknown_arguments([a.name for a in arguments]),
        OpaqueFunction(function=fastdds_profile), OpaqueFunction(function=_segment_node)])
