"""BackgroundNode: a spun rclpy node in its own context, as the tools and tests use it."""
import time

import pytest

from ros_utils import setup_test_process_env, unique_domain_id, wait_for

from cmkd_ros.nodes.background_node import BackgroundNode

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)


def test_background_nodes_exchange_messages_and_close_cleanly():
    from std_msgs.msg import String
    setup_test_process_env()
    domain = unique_domain_id()
    received = []
    with BackgroundNode('bg_listener', domain) as listener, \
            BackgroundNode('bg_talker', domain) as talker:
        listener.node.create_subscription(String, 'bg_chatter', received.append, 10)
        pub = talker.node.create_publisher(String, 'bg_chatter', 10)
        wait_for(lambda: pub.get_subscription_count() > 0, 20, 'discovery')
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            pub.publish(String(data='hello'))
            time.sleep(0.1)
        assert received and received[0].data == 'hello'
    for bg in (listener, talker):
        assert not bg.context.ok()
        assert not bg._thread.is_alive()
