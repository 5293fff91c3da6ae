"""Replay a rosbag2 into the segment node, or score the node on the bag.

Replay and look (RViz on the output topic):
    ros2 launch cmkd_ros replay_evaluate.launch.py bag:=drive.mcap checkpoint:=student.pt
Score it (mIoU against /lidar/labels, latency, drops; JSON report):
    ros2 launch cmkd_ros replay_evaluate.launch.py bag:=drive.mcap checkpoint:=student.pt \
        evaluate:=true json:=report.json
"""
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess,
                            IncludeLaunchDescription, OpaqueFunction, RegisterEventHandler)
from launch.conditions import IfCondition, UnlessCondition
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import FindExecutable, LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare

from cmkd_ros.nodes.launch_support import (fail_launch_if_exits_with_error, fastdds_profile,
                                     reject_unknown_arguments)


def generate_launch_description():
    share = FindPackageShare('cmkd_ros')
    evaluate = LaunchConfiguration('evaluate')
    arguments = [
        DeclareLaunchArgument('bag', description='rosbag2 folder or file (MCAP or sqlite3)'),
        DeclareLaunchArgument('checkpoint', description='student checkpoint (.pt)'),
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
    # Replay mode: segment.launch.py with the same arguments (empty device / precision keep
    # the params file's values there too).
    segment = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, 'launch',
                                                            'segment.launch.py'])),
        launch_arguments={
            'checkpoint': LaunchConfiguration('checkpoint'),
            'params_file': LaunchConfiguration('params_file'),
            'device': LaunchConfiguration('device'),
            'precision': LaunchConfiguration('precision'),
            'use_sim_time': LaunchConfiguration('use_sim_time'),
            'input_pointcloud': LaunchConfiguration('input_pointcloud'),
            'output_pointcloud': LaunchConfiguration('output_pointcloud'),
            'fastdds_profile': LaunchConfiguration('fastdds_profile'),
        }.items(),
        condition=UnlessCondition(evaluate))
    # `python3 -m cmkd_ros.tools.cli`: colcon puts the `cmkd` script in lib/cmkd_ros, off the PATH.
    python = FindExecutable(name='python3')
    replay = ExecuteProcess(
        cmd=[python, '-m', 'cmkd_ros.tools.cli', 'replay', LaunchConfiguration('bag'), '--clock',
             '--rate', LaunchConfiguration('rate'),
             '--wait-for', LaunchConfiguration('input_pointcloud')],
        output='screen', condition=UnlessCondition(evaluate))
    score = ExecuteProcess(
        cmd=[python, '-m', 'cmkd_ros.tools.cli', 'evaluate-bag', LaunchConfiguration('bag'),
             '--checkpoint', LaunchConfiguration('checkpoint'),
             '--params-file', LaunchConfiguration('params_file'),
             # one word each, so that an empty value stays an (empty) argument
             ['--device=', LaunchConfiguration('device')],
             ['--precision=', LaunchConfiguration('precision')],
             '--rate', LaunchConfiguration('rate'),
             '--points-topic', LaunchConfiguration('input_pointcloud'),
             '--json', LaunchConfiguration('json')],
        output='screen', condition=IfCondition(evaluate))
    stop_after = [RegisterEventHandler(OnProcessExit(target_action=action,
                                                     on_exit=[EmitEvent(event=Shutdown())]))
                  for action in (replay, score)]
    return LaunchDescription(arguments + [
        reject_unknown_arguments([a.name for a in arguments]),
        OpaqueFunction(function=fastdds_profile), segment, replay, score,
        fail_launch_if_exits_with_error(replay), fail_launch_if_exits_with_error(score),
    ] + stop_after)
