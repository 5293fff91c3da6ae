"""``cmkd rig``: the rig calibration a rosbag2 already holds, from its TF and CameraInfo.

Robots keep their extrinsics in TF (``/tf_static`` from robot_state_publisher, REP 105) and
their intrinsics in CameraInfo. :func:`rig_from_bag` builds a
:class:`~cmkd_ros.calibration.RigCalibration` from a bag: one camera per CameraInfo topic (named
after the topic: ``/cameras/front/camera_info`` -> ``front``), intrinsics from its first
message, the optical frame from its ``header.frame_id`` and ``T_cam_lidar`` from the TF chain
between the LiDAR frame and that optical frame (:mod:`cmkd_ros.tf_tree`). The LiDAR frame is
the ``frame_id`` of the bag's PointCloud2 messages unless named.

:func:`resolve_rig` is where tools and the collect node get a rig: a calibration YAML when one
is given, else a bag's TF and CameraInfo. :func:`extrinsics_difference` measures how far two
calibrations of one camera disagree.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cmkd_ros.calibration import RigCalibration
from cmkd_ros.tf_tree import TfError, TransformTree, transform_difference


class RigError(ValueError):
    """A bag or the options cannot give a rig calibration; the message says what is missing."""


@dataclass(frozen=True)
class BagRig:
    """A rig read from a bag, with what it came from."""

    rig: RigCalibration
    tree: TransformTree
    info_topics: dict[str, str]        # camera name -> CameraInfo topic
    warnings: tuple[str, ...] = ()


def camera_name(topic: str) -> str:
    """Camera name of a CameraInfo topic: the namespace part before ``camera_info``."""
    parts = [p for p in topic.split('/') if p]
    return parts[-2] if len(parts) >= 2 and parts[-1] == 'camera_info' else parts[-1]


def camera_info_topics(available: Sequence[str], cameras: Sequence[str] = (),
                       template: str | None = None) -> dict[str, str]:
    """``{camera name: CameraInfo topic}`` chosen among ``available`` topics.

    ``cameras`` items are a name or ``NAME=TOPIC``; a name's topic is ``template`` with
    ``{camera}`` replaced, or the one topic named after it (:func:`camera_name`). Without
    ``cameras``: every topic matching ``template``, or every CameraInfo topic.
    """
    if not available:
        raise RigError('no sensor_msgs/CameraInfo topic: the intrinsics and each camera\'s '
                       'optical frame come from it')
    if template is not None and template.count('{camera}') != 1:
        raise RigError(f'CameraInfo topic template {template!r} must contain {{camera}} once')
    if template is not None and not cameras:
        before, after = template.split('{camera}')
        pattern = re.compile(re.escape(before) + '([^/]+)' + re.escape(after) + '$')
        found = {m.group(1): t for t in available if (m := pattern.match(t))}
        if not found:
            raise RigError(f'no CameraInfo topic matches {template!r}; the bag has '
                           f'{sorted(available)}')
        return found
    derived: dict[str, list[str]] = {}
    for topic in available:
        derived.setdefault(camera_name(topic), []).append(topic)
    if not cameras:
        twice = {n: ts for n, ts in derived.items() if len(ts) > 1}
        if twice:
            raise RigError(f'CameraInfo topics with the same camera name: {twice}; name them '
                           'as NAME=TOPIC')
        return {n: ts[0] for n, ts in derived.items()}
    out: dict[str, str] = {}
    for item in cameras:
        name, sep, topic = item.partition('=')
        if not sep:
            if template is not None:
                topic = template.format(camera=name)
            elif len(derived.get(name, ())) == 1:
                topic = derived[name][0]
            else:
                raise RigError(f'camera {name!r}: ' + (
                    f'several CameraInfo topics {derived[name]}; name one as NAME=TOPIC'
                    if name in derived else f'no CameraInfo topic; the bag\'s cameras are '
                    f'{sorted(derived)}'))
        if not name or topic not in available:
            raise RigError(f'camera {item!r}: no CameraInfo topic {topic!r}; the bag has '
                           f'{sorted(available)}')
        if name in out:
            raise RigError(f'camera {name!r} named twice')
        out[name] = topic
    return out


def _first_messages(bag: str, topics: Sequence[str]) -> dict[str, object]:
    """The first message (rosbags object) of each of ``topics``."""
    from cmkd_ros.bag import deserialize, read_messages
    first: dict[str, object] = {}
    with contextlib.closing(read_messages(bag, sorted(set(topics)))) as messages:
        for topic, msgtype, _, raw in messages:
            if topic not in first:
                first[topic] = deserialize(raw, msgtype)
                if len(first) == len(set(topics)):
                    break
    return first


def cloud_frame(bag: str, topics: dict[str, tuple[str, int]]) -> str:
    """The one ``frame_id`` of the bag's PointCloud2 topics (their first messages)."""
    from cmkd_ros.bag import POINTCLOUD2
    clouds = [t for t, (kind, count) in topics.items() if kind == POINTCLOUD2 and count]
    if not clouds:
        raise RigError(f'{bag}: no PointCloud2 message to take the LiDAR frame from; name the '
                       'LiDAR frame')
    frames = {t: msg.header.frame_id for t, msg in _first_messages(bag, clouds).items()}
    if len(set(frames.values())) != 1:
        raise RigError(f'{bag}: the PointCloud2 topics have several frames {frames}; name the '
                       'LiDAR frame')
    return next(iter(frames.values()))


def rig_from_bag(bag: str | os.PathLike, lidar_frame: str | None = None,
                 cameras: Sequence[str] = (), camera_info_topic: str | None = None) -> BagRig:
    """The rig a bag holds: CameraInfo intrinsics, extrinsics from TF (see module docstring).

    ``cameras`` and ``camera_info_topic`` choose the CameraInfo topics
    (:func:`camera_info_topics`); ``lidar_frame`` defaults to the PointCloud2 frame.
    """
    from cmkd_ros.bag import CAMERA_INFO, bag_topics
    from cmkd_ros.calibration import CalibrationError, calibration_from_camera_info
    from cmkd_ros.tf_tree import tree_from_bag
    bag = str(bag)
    if not os.path.isfile(os.path.join(bag, 'metadata.yaml')):
        raise RigError(f'{bag} is not a rosbag2 folder (no metadata.yaml)')
    topics = bag_topics(bag)
    try:
        infos = camera_info_topics([t for t, (k, _) in topics.items() if k == CAMERA_INFO],
                                   cameras, camera_info_topic)
    except RigError as exc:
        raise RigError(f'{bag}: {exc}') from None
    tree = tree_from_bag(bag)
    lidar = lidar_frame or cloud_frame(bag, topics)
    first = _first_messages(bag, list(infos.values()))
    out, warnings = [], []
    for name, topic in infos.items():
        if topic not in first:
            raise RigError(f'{bag}: camera {name!r}: no message on {topic}')
        msg = first[topic]
        optical = msg.header.frame_id
        if not optical:
            raise RigError(f'{bag}: camera {name!r}: CameraInfo on {topic} has an empty '
                           'header.frame_id, so its optical frame is unknown')
        try:
            out.append(calibration_from_camera_info(msg, tree.lookup(optical, lidar), name))
        except (TfError, CalibrationError) as exc:
            raise RigError(f'{bag}: camera {name!r} ({topic}): {exc}') from None
        optical_children = [c for c in tree.children(optical) if 'optical' in c]
        if optical_children:
            warnings.append(f'camera {name!r}: CameraInfo names the frame {optical!r}, whose '
                            f'child {optical_children[0]!r} looks like the optical frame '
                            '(REP 103: z forward, x right, y down) that CameraInfo should name')
    return BagRig(RigCalibration(tuple(out), lidar), tree, infos, tuple(warnings))


def resolve_rig(calibration: str | None = None, tf_bag: str | None = None, *,
                lidar_frame: str | None = None, cameras: Sequence[str] = (),
                camera_info_topic: str | None = None) -> RigCalibration:
    """The rig of a calibration YAML when given, else of a bag's TF and CameraInfo
    (:func:`rig_from_bag`)."""
    if calibration:
        return RigCalibration.load(calibration)
    if tf_bag:
        return rig_from_bag(tf_bag, lidar_frame, cameras, camera_info_topic).rig
    raise RigError('no rig: give a calibration YAML or a bag with TF and CameraInfo')


def extrinsics_difference(T_cam_lidar_a: np.ndarray, T_cam_lidar_b: np.ndarray
                          ) -> tuple[float, float]:
    """(degrees, centimetres) between two ``T_cam_lidar``: the rotation angle between them and
    the distance between the camera positions (in the LiDAR frame)."""
    from cmkd_ros.motion import invert
    angle, offset = transform_difference(invert(T_cam_lidar_a), invert(T_cam_lidar_b))
    return float(np.degrees(angle)), offset * 100.0


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', help='rosbag2 folder (MCAP or sqlite3) with /tf_static (or '
                                    'static /tf) and CameraInfo topics')
    parser.add_argument('--out', required=True, help='rig calibration YAML to write')
    parser.add_argument('--lidar-frame', default=None,
                        help='LiDAR frame (default: the frame_id of the bag\'s PointCloud2 '
                             'messages, when they have one)')
    parser.add_argument('--cameras', nargs='+', default=[], metavar='NAME[=TOPIC]',
                        help='cameras to take (default: one per CameraInfo topic, named after '
                             'it: /cameras/front/camera_info -> front)')
    parser.add_argument('--camera-info-topic', default=None, metavar='TEMPLATE',
                        help='CameraInfo topic template with {camera}, e.g. '
                             '/sensing/camera/{camera}/camera_info')


def run(args: argparse.Namespace) -> int:
    try:
        found = rig_from_bag(args.bag, args.lidar_frame, args.cameras, args.camera_info_topic)
        found.rig.save(args.out)
    except (ValueError, OSError) as exc:       # RigError, TfError, BagError, CalibrationError
        print(f'cmkd rig: {exc}', file=sys.stderr)
        return 2
    rig = found.rig
    for cam in rig.cameras:
        chain = ' -> '.join(found.tree.chain(cam.frame_id, rig.lidar_frame))
        x, y, z = np.linalg.inv(cam.T_cam_lidar)[:3, 3]
        print(f'{cam.name}: {found.info_topics[cam.name]} {cam.width}x{cam.height} '
              f'{cam.distortion_model}; {chain}; camera at ({x:.3f}, {y:.3f}, {z:.3f}) m in '
              f'{rig.lidar_frame}')
    for moving in found.tree.moving.values():
        print(f'not used: {moving.describe()}')
    for warning in found.warnings:
        print(f'cmkd rig: warning: {warning}', file=sys.stderr)
    print(f'wrote {args.out} ({len(rig)} camera(s), LiDAR frame {rig.lidar_frame})')
    return 0
