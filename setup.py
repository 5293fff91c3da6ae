"""ament_python package for cmkd_ros; also installable with plain pip.

Dependencies are declared here once. ``scripts/constraints.txt`` pins the versions this project
is tested with (e.g. the CPU build of torch); a full ROS 2 install provides the ``ros`` extra's
packages from apt instead of PyPI.
"""
from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'cmkd_ros'
# ROS 2 packages from PyPI: Kilted's wheels are named ros-<name>, Jazzy's ros-jazzy-<name>.
ROS_WHEELS = ['rclpy', 'sensor-msgs', 'std-msgs', 'geometry-msgs', 'rosgraph-msgs', 'nav-msgs',
              'diagnostic-msgs', 'rmw-fastrtps-cpp', 'lifecycle-msgs', 'rcl-interfaces',
              'ament-index-python']


def _files(pattern):
    return sorted(f for f in glob(pattern) if os.path.isfile(f))


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(include=[PACKAGE, PACKAGE + '.*', 'offline_training',
                                    'offline_training.*']),
    package_data={PACKAGE + '.sparse': ['csrc/*.cpp']},  # compiled at install (build_native.sh)
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', _files('launch/*.py')),
        ('share/' + PACKAGE + '/config', _files('config/*.yaml') + _files('config/*.xml')),
    ],
    python_requires='>=3.10',
    install_requires=[
        'numpy>=1.24',
        'pyyaml>=6',
        'opencv-python-headless>=4.8',
        'rosbags>=0.10',
        'tqdm>=4.60',
        'matplotlib>=3.7',
        'torch>=2.1',
        'pypcd4>=1.5',          # PCD files for cmkd overlay (ascii, binary, binary_compressed)
    ],
    extras_require={
        # ROS 2 from PyPI wheels (Kilted, or Jazzy); a full ROS 2 install provides them via apt.
        'ros': ['ros-' + name for name in ROS_WHEELS],
        'ros-jazzy': ['ros-jazzy-' + name for name in ROS_WHEELS],
        # What the ros2 launch / ros2cli wheels (not on PyPI, see CMKD_EXTRA_WHEELS in
        # scripts/install.sh) need from PyPI: they declare no dependencies themselves.
        'ros2cli': ['psutil', 'lark', 'importlib-metadata', 'packaging', 'pyyaml'],
        'train': ['tensorboard>=2.12'],
        'dev': ['pytest>=7', 'pytest-timeout>=2', 'colcon-common-extensions>=0.3'],
    },
    zip_safe=True,
    maintainer='cmkd_ros maintainers',
    maintainer_email='maintainers@cmkd-ros.invalid',
    description='Crossmodal knowledge distillation (camera to LiDAR) for ROS 2.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'cmkd = cmkd_ros.tools.cli:main',
            'collect_node = cmkd_ros.nodes.collect_node:main',
            'segment_node = cmkd_ros.nodes.segment_node:main',
        ],
    },
)
