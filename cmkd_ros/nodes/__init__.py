"""ROS 2 nodes (rclpy): thin adapters over the ROS-free pipelines in ``cmkd_ros.pipelines``.

``ros_io`` holds the shared rclpy helpers (QoS, parameters from the config schema, diagnostics,
node entry point), ``launch_support`` what the launch files share, ``background_node`` a node
spun in a thread for tools and tests. See docs/nodes.md.
"""
