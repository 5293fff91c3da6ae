"""ROS-free cores of the nodes: each takes decoded inputs and returns outputs, so the nodes,
``cmkd evaluate-bag``, benchmarks and tests run exactly the same code without rclpy.

``segment``: the segment node's config, student loading and point labeling; ``collect``: the
collect node's config and pair assembly.
"""
