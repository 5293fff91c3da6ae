"""cmkd_ros: crossmodal (camera to LiDAR) knowledge distillation for ROS 2.

The library imports without ROS: geometry, models, losses and data code know nothing of rclpy;
``cmkd_ros.nodes`` holds the thin ROS 2 adapters.
"""
__version__ = '0.1.0'
