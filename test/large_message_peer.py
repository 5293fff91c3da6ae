"""A publisher or subscriber of large best-effort PointCloud2 messages, run as its own process.

    python large_message_peer.py pub COUNT MEGABYTES   (waits for a subscriber, 10 Hz)
    python large_message_peer.py sub SECONDS           (prints the number received)
"""
import sys
import time

import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import PointCloud2, PointField

TOPIC = '/large_message_test'


def main() -> None:
    mode = sys.argv[1]
    rclpy.init()
    node = rclpy.create_node(f'large_message_{mode}')
    if mode == 'pub':
        count, megabytes = int(sys.argv[2]), float(sys.argv[3])
        pub = node.create_publisher(PointCloud2, TOPIC, qos_profile_sensor_data)
        points = int(megabytes * 1e6 / 16)
        msg = PointCloud2(height=1, width=points, point_step=16, row_step=16 * points,
                          is_dense=True, fields=[PointField(name=n, offset=4 * i, datatype=7,
                                                            count=1)
                                                 for i, n in enumerate('xyzi')])
        msg.data = bytes(16 * points)
        deadline = time.monotonic() + 30
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)                          # let the subscriber match the publisher too
        start = time.monotonic()
        for i in range(count):
            msg.header.frame_id = str(i)
            pub.publish(msg)
            time.sleep(max(0.0, start + (i + 1) * 0.1 - time.monotonic()))
    else:
        received = []
        node.create_subscription(PointCloud2, TOPIC, lambda m: received.append(m.width),
                                 qos_profile_sensor_data)
        end = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.1)
        print(f'received {len(received)}')
    node.destroy_node()
    rclpy.shutdown()


if __name__ == '__main__':
    main()
