"""Collect node: synchronize a LiDAR with cameras and log distillation pairs.

    ros2 launch cmkd_ros collect.launch.py calibration_file:=/path/rig.yaml \
        output_dir:=/data/pairs input_pointcloud:=/lidar/points
    ros2 launch cmkd_ros collect.launch.py tf_bag:=/data/drive output_dir:=/data/pairs

The cameras are those of the calibration file unless ``cameras:=front,left`` (or the params
file) names some; giving ``output_dir`` turns recording on unless ``record:=false``.
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
OPTIONAL_PARAMETERS = {'calibration_file': ('calibration_file', str),
                       'tf_bag': ('tf.bag', str),
                       'record': ('record.enabled', bool),
                       'output_dir': ('record.output_dir', str),
                       'cameras': ('cameras', list)}


def _collect_node(context):
    given = optional_parameters(context, OPTIONAL_PARAMETERS)
    if 'record.output_dir' in given:   # a folder to record into means: record
        given.setdefault('record.enabled', True)
    node = Node(
        package='cmkd_ros', executable='collect_node', name='collect_node', output='screen',
        parameters=[LaunchConfiguration('params_file'), {
            'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'),
                                           value_type=bool),
        }, given],
        remappings=[('~/input/pointcloud', LaunchConfiguration('input_pointcloud')),
                    ('~/input/odom', LaunchConfiguration('input_odom')),
                    ('~/output/overlay', LaunchConfiguration('output_overlay'))])
    return [node, fail_launch_if_exits_with_error(node)]


def generate_launch_description():
    share = FindPackageShare('cmkd_ros')
    arguments = [
        DeclareLaunchArgument('calibration_file', default_value='',
                              description="rig calibration YAML (RigCalibration schema); '': "
                              'extrinsics from TF (tf_bag, else the live /tf_static)'),
        DeclareLaunchArgument('tf_bag', default_value='',
                              description='rosbag2 whose /tf_static and CameraInfo give the '
                              "rig when calibration_file is '' (as cmkd rig does)"),
        DeclareLaunchArgument(
            'params_file', description='collect node parameters (ros__parameters YAML; '
            'cameras, topic templates, sync, record, ...)',
            default_value=PathJoinSubstitution([share, 'config', 'collect_node.param.yaml'])),
        DeclareLaunchArgument('output_dir', default_value='',
                              description="pair dataset folder; giving one turns recording "
                              "on ('': the params file's, where recording is off)"),
        DeclareLaunchArgument('record', default_value='',
                              description="write pairs: true or false ('': true when "
                              "output_dir is given, else the params file's; switchable at "
                              'runtime: ros2 param set /collect_node record.enabled true)'),
        DeclareLaunchArgument('cameras', default_value='',
                              description="cameras to collect, e.g. front,front_left ('': "
                              "the params file's, default every camera of the calibration "
                              'file)'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='use /clock (true when replaying a bag)'),
        DeclareLaunchArgument('input_pointcloud', default_value='/lidar/points',
                              description='LiDAR PointCloud2 topic'),
        DeclareLaunchArgument('input_odom', default_value='/odom',
                              description='odometry (T_world_lidar) used when '
                              'use_odometry is true in params_file'),
        DeclareLaunchArgument('output_overlay', default_value='~/output/overlay',
                              description='overlay image topic'),
        DeclareLaunchArgument(
            'fastdds_profile', description='Fast DDS profile enlarging shared memory for '
            "large clouds and images ('' keeps the environment's)",
            default_value=PathJoinSubstitution([share, 'config', 'fastdds_shm.xml'])),
    ]
    return LaunchDescription(arguments + [
        reject_unknown_arguments([a.name for a in arguments]),
        OpaqueFunction(function=fastdds_profile), OpaqueFunction(function=_collect_node)])
