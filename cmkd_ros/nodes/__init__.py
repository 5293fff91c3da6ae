"""ROS 2 nodes (rclpy): thin adapters over the ROS-free library; see docs/nodes.md.

``labeling`` and ``collecting`` hold their ROS-free cores; ``ros_io`` the shared rclpy helpers.
"""
