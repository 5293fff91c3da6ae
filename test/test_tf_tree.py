"""Static transform tree: chains in both directions, broken chains, /tf judged static or moving."""
import numpy as np
import pytest

from cmkd_ros import bag
from cmkd_ros.motion import invert, rotvec_to_matrix
from cmkd_ros.tf_tree import (TfError, TransformTree, transform_difference, tree_from_bag,
                              tree_from_messages)


def _pose(rotvec, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rotvec_to_matrix(np.asarray(rotvec, np.float64))
    T[:3, 3] = t
    return T


EDGES = {('base_link', 'lidar'): _pose([0, 0, 0.1], [0.5, 0, 1.8]),
         ('base_link', 'cam_link'): _pose([0, 0.05, 0.9], [1.4, 0.3, 1.2]),
         ('cam_link', 'cam_optical_frame'): _pose([-1.2092, 1.2092, -1.2092], [0, 0, 0])}


def _tree(edges=EDGES) -> TransformTree:
    tree = TransformTree()
    for (parent, child), T in edges.items():
        tree.add(parent, child, T)
    return tree


def test_lookup_walks_chains_up_and_down_and_inverts():
    tree = _tree()
    T_base_lidar = EDGES[('base_link', 'lidar')]
    T_base_optical = EDGES[('base_link', 'cam_link')] @ EDGES[('cam_link', 'cam_optical_frame')]
    T_optical_lidar = invert(T_base_optical) @ T_base_lidar
    np.testing.assert_allclose(tree.lookup('cam_optical_frame', 'lidar'), T_optical_lidar,
                               atol=1e-12)
    np.testing.assert_allclose(tree.lookup('lidar', 'cam_optical_frame'),
                               invert(T_optical_lidar), atol=1e-12)
    np.testing.assert_allclose(tree.lookup('lidar', 'base_link'), invert(T_base_lidar),
                               atol=1e-12)
    np.testing.assert_array_equal(tree.lookup('lidar', 'lidar'), np.eye(4))
    np.testing.assert_array_equal(tree.lookup('/lidar', 'base_link'), tree.lookup('lidar',
                                                                                  'base_link'))
    # a point seen by the LiDAR lands where the chain of poses says
    p_lidar = np.array([10.0, -2.0, 0.5, 1.0])
    np.testing.assert_allclose(tree.lookup('cam_optical_frame', 'lidar') @ p_lidar,
                               np.linalg.solve(T_base_optical, T_base_lidar @ p_lidar))
    assert tree.chain('cam_optical_frame', 'lidar') == ['lidar', 'base_link', 'cam_link',
                                                         'cam_optical_frame']


def test_broken_chain_names_both_sides_and_the_frame_without_parent():
    edges = dict(EDGES)
    del edges[('base_link', 'cam_link')]
    tree = _tree(edges)
    with pytest.raises(TfError) as err:
        tree.lookup('cam_optical_frame', 'lidar')
    message = str(err.value)
    assert "no TF chain from 'lidar' to 'cam_optical_frame'" in message
    assert "'lidar' connects to [base_link, lidar] (top 'base_link')" in message
    assert ("'cam_optical_frame' to [cam_link, cam_optical_frame] (top 'cam_link', which has no "
            "parent)") in message
    assert "a parent for 'cam_link'" in message
    with pytest.raises(TfError, match=r"frame 'camera' is not in the TF tree \(frames: "
                                      r"\[base_link, cam_link, cam_optical_frame, lidar\]\)"):
        tree.lookup('camera', 'lidar')


def test_tree_rejects_two_parents_cycles_and_bad_transforms():
    tree = _tree()
    with pytest.raises(TfError, match="frame 'lidar' has two parents, 'base_link' and 'odom'"):
        tree.add('odom', 'lidar', np.eye(4))
    with pytest.raises(TfError, match='would close a cycle'):
        tree.add('cam_optical_frame', 'base_link', np.eye(4))
    with pytest.raises(TfError, match='two different, non-empty frame ids'):
        tree.add('lidar', 'lidar', np.eye(4))
    with pytest.raises(TfError, match='finite 4x4'):
        tree.add('lidar', 'x', np.full((4, 4), np.nan))
    tree.add('base_link', 'lidar', np.eye(4))            # same parent: replaced
    np.testing.assert_array_equal(tree.lookup('base_link', 'lidar'), np.eye(4))


def _write_tf_bag(path, storage, dynamic_steps):
    """/tf_static: base_link -> cam_link -> optical; /tf: base_link -> lidar republished
    unchanged at 10 Hz and odom -> base_link driving ``dynamic_steps`` m per message."""
    start = 1_700_000_000_000_000_000
    with bag.BagWriter(path, storage) as writer:
        store = writer.typestore
        static = [(p, c, T) for (p, c), T in EDGES.items() if c != 'lidar']
        writer.write(bag.TF_STATIC_TOPIC, bag.tf_message(store, start, static), start)
        for i in range(5):
            stamp = start + i * 100_000_000
            jitter = EDGES[('base_link', 'lidar')].copy()
            jitter[0, 3] += 1e-5 * i                        # float noise of a republisher
            odom = _pose([0, 0, 0.01 * i], [dynamic_steps * i, 0, 0])
            writer.write(bag.TF_TOPIC, bag.tf_message(store, stamp, [
                ('base_link', 'lidar', jitter), ('odom', 'base_link', odom)]), stamp)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_tree_from_bag_takes_tf_static_and_static_looking_tf(tmp_path, storage):
    _write_tf_bag(tmp_path / 'b', storage, dynamic_steps=1.0)
    tree = tree_from_bag(tmp_path / 'b')
    T = tree.lookup('cam_optical_frame', 'lidar')
    expected = _tree().lookup('cam_optical_frame', 'lidar')
    angle, offset = transform_difference(T, expected)
    assert angle < 1e-12 and offset <= 4e-5 + 1e-12      # the last /tf value (jitter 4e-5 m)
    assert 'odom' not in tree and list(tree.moving) == ['base_link']
    with pytest.raises(TfError) as err:
        tree.lookup('odom', 'lidar')
    assert "/tf has 'odom' -> 'base_link' but it moves (up to 2.29 deg and 400 cm" in \
        str(err.value)


def test_tf_edges_seen_once_or_beyond_tolerance_are_not_static(tmp_path):
    class Msg:                                            # tf2_msgs/TFMessage-like
        def __init__(self, T):
            from types import SimpleNamespace as NS
            q = bag.rotation_to_quaternion(T[:3, :3])
            self.transforms = [NS(header=NS(frame_id='base_link'), child_frame_id='lidar',
                                  transform=NS(translation=NS(x=T[0, 3], y=T[1, 3], z=T[2, 3]),
                                               rotation=NS(x=q[0], y=q[1], z=q[2], w=q[3])))]
    T = EDGES[('base_link', 'lidar')]
    once = tree_from_messages([], [Msg(T)])
    assert 'lidar' not in once and 'only 1 time(s)' in once.moving['lidar'].describe()
    turned = T.copy()
    turned[:3, :3] = rotvec_to_matrix(np.array([0, 0, 0.0011])) @ T[:3, :3]   # > 1 mrad
    assert 'lidar' in tree_from_messages([], [Msg(T), Msg(T)])
    assert 'lidar' not in tree_from_messages([], [Msg(T), Msg(turned)])


def test_tree_from_bag_without_tf(tmp_path):
    from cmkd_ros.conversions import array_to_image
    with bag.BagWriter(tmp_path / 'b') as writer:
        writer.write('/img', array_to_image(np.zeros((2, 2, 3), np.uint8), 'rgb8', 1, 'c',
                                            writer.msg_types()), 1)
    with pytest.raises(TfError, match='no /tf_static or /tf topic'):
        tree_from_bag(tmp_path / 'b')
