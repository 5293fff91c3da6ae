"""rosbag2 export (MCAP and sqlite3) read back through rclpy deserialization."""
import numpy as np
import pytest
from builtin_interfaces.msg import Time  # noqa: F401  (rclpy message packages present)
from nav_msgs.msg import Odometry
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from cmkd_ros import bag
from cmkd_ros.conversions import cloud_to_array, image_to_array, stamp_ns
from cmkd_ros.sim import SimWorld
from cmkd_ros.tf_tree import message_matrix

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)

RCLPY_CLASSES = {bag.POINTCLOUD2: PointCloud2, bag.IMAGE: Image,
                 bag.COMPRESSED_IMAGE: CompressedImage, bag.CAMERA_INFO: CameraInfo,
                 bag.ODOMETRY: Odometry}
CONFIG = {'seed': 21, 'lidar': {'beams': 16, 'horizontal_resolution_deg': 0.8},
          'cameras': {'count': 2, 'width': 128, 'height': 72}}


@pytest.fixture(scope='module')
def drive():
    world = SimWorld(CONFIG)
    return world, [world.frame(i) for i in range(2)]


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_bag_round_trip_through_rclpy(tmp_path, drive, storage):
    world, frames = drive
    path = tmp_path / f'drive_{storage}'
    with bag.SimBagWriter(path, world.calibration, storage, images='both',
                          static_transforms=world.static_transforms()) as writer:
        for f in frames:
            writer.write_frame(f)
    assert bag.load_calibration(path).to_dict() == world.calibration.to_dict()
    topics = bag.bag_topics(path)
    assert topics[bag.POINTS_TOPIC] == (bag.POINTCLOUD2, 2)
    assert topics[bag.LABELS_TOPIC] == (bag.POINTCLOUD2, 2)
    by_stamp = {f.lidar_stamp_ns: f for f in frames}
    seen = {}
    odom_stamps = []
    # /tf_static (tf2_msgs is not an rclpy package here: read with rosbags): once, first.
    (_, msgtype, tf_stamp, raw), = bag.read_messages(path, [bag.TF_STATIC_TOPIC])
    first_odom, *_ = bag.read_messages(path, [bag.ODOM_TOPIC])
    assert tf_stamp == first_odom[2] and msgtype == bag.TF_MESSAGE
    sent = bag.deserialize(raw, msgtype).transforms
    assert [(tf.header.frame_id, tf.child_frame_id) for tf in sent] == [
        (parent, child) for parent, child, _ in world.static_transforms()]
    for tf, (_, _, T) in zip(sent, world.static_transforms()):
        assert stamp_ns(tf) == tf_stamp
        np.testing.assert_allclose(message_matrix(tf.transform), T, atol=1e-12)
    del topics[bag.TF_STATIC_TOPIC]
    for topic, msgtype, stamp, raw in bag.read_messages(path, list(topics)):
        msg = deserialize_message(raw, RCLPY_CLASSES[msgtype])
        header_ns = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
        assert header_ns == stamp
        seen[topic] = seen.get(topic, 0) + 1
        if topic == bag.POINTS_TOPIC:
            f = by_stamp[stamp]
            arr = cloud_to_array(msg)
            assert [fd.name for fd in msg.fields] == ['x', 'y', 'z', 'intensity', 'ring', 'time']
            xyz = np.stack([arr['x'], arr['y'], arr['z']], 1)
            assert np.array_equal(xyz, f.xyz)
            assert np.array_equal(arr['intensity'], f.intensity)
            assert np.array_equal(arr['ring'], f.ring)
            assert np.allclose(arr['time'], (f.point_time_ns - stamp) * 1e-9, atol=1e-7)
            assert msg.header.frame_id == world.calibration.lidar_frame
        elif topic == bag.LABELS_TOPIC:
            assert np.array_equal(cloud_to_array(msg)['label'], by_stamp[stamp].labels)
        elif topic == bag.ODOM_TOPIC:
            odom_stamps.append(stamp)
            pose = world.poses([stamp])[0]
            p = msg.pose.pose.position
            q = msg.pose.pose.orientation
            assert np.allclose([p.x, p.y, p.z], pose[:3, 3], atol=1e-9)
            assert np.allclose(bag.quaternion_to_rotation([q.x, q.y, q.z, q.w]), pose[:3, :3],
                               atol=1e-9)
            assert 4.0 < msg.twist.twist.linear.x < 16.0      # ego speed 5-15 m/s, forward
        else:
            name = topic.split('/')[2]
            f = next(f for f in frames if stamp in f.camera_stamp_ns)
            c = f.camera_index(name)
            assert stamp == f.camera_stamp_ns[c]
            if msgtype == bag.IMAGE:
                assert msg.encoding == 'rgb8'
                assert np.array_equal(image_to_array(msg), f.images[c])
            elif msgtype == bag.COMPRESSED_IMAGE:
                diff = np.abs(image_to_array(msg).astype(int) - f.images[c])
                assert diff.mean() < 6
            else:
                cam = world.calibration.camera(name)
                assert msg.distortion_model == 'plumb_bob'
                assert np.allclose(np.asarray(msg.d), cam.D)
                assert np.allclose(np.asarray(msg.k).reshape(3, 3), cam.K)
                assert (msg.width, msg.height) == (cam.width, cam.height)
    for name in world.calibration.names:
        for key in ('image', 'compressed', 'info'):
            assert seen[bag.camera_topics(name)[key]] == 2
    # Odometry: strictly increasing, at least 100 Hz, covering both frames.
    odom = np.sort(odom_stamps)
    assert np.all(np.diff(odom) > 0) and np.diff(odom).max() <= 10_000_000
    assert odom[0] <= frames[0].lidar_stamp_ns and odom[-1] >= frames[-1].lidar_stamp_ns


def test_bag_writer_and_reader_errors(tmp_path):
    with pytest.raises(bag.BagError, match='storage'):
        bag.BagWriter(tmp_path / 'x', storage='rosbag1')
    (tmp_path / 'exists').mkdir()
    with pytest.raises(bag.BagError, match='already exists'):
        bag.BagWriter(tmp_path / 'exists')
    with pytest.raises(bag.BagError, match='not a rosbag2'):
        list(bag.read_messages(tmp_path / 'exists'))
    with bag.BagWriter(tmp_path / 'b', 'sqlite3') as writer:
        info = writer.msg_types()
        from cmkd_ros.conversions import array_to_image
        msg = array_to_image(np.zeros((4, 5, 3), np.uint8), 'rgb8', 7, 'cam', info)
        writer.write('/img', msg, 7)
        with pytest.raises(bag.BagError, match='already carries'):
            writer.write_raw('/img', bag.POINTCLOUD2, 8, b'')
        with pytest.raises(bag.BagError, match='not a rosbags message'):
            writer.write('/img', object(), 9)
    with pytest.raises(bag.BagError, match='no topic'):
        list(bag.read_messages(tmp_path / 'b', ['/nope']))
    (topic, msgtype, stamp, raw), = bag.read_messages(tmp_path / 'b')
    assert (topic, msgtype, stamp) == ('/img', bag.IMAGE, 7)
    assert bag.deserialize(raw, msgtype).width == 5


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        R = bag.quaternion_to_rotation(q)
        assert np.allclose(bag.quaternion_to_rotation(bag.rotation_to_quaternion(R)), R)
