"""ROS-free cores of the nodes: each takes decoded inputs and returns outputs, so the nodes,
benchmarks and tests run exactly the same code, the tests and benchmarks without rclpy.

``segment``: the segment node's config, student loading and :class:`SegmentPipeline`;
``collect``: the collect node's config, :class:`CollectPipeline` and pair assembly; ``intake``:
the LiDAR cloud intake both nodes share (size bound, decoding, finite points) and the
``Report`` interface the pipelines report through; ``work_queue``: the bounded queue between
a node's callbacks and its worker threads.
"""
