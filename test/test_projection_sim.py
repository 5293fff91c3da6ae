"""Correspondence quality against the synthetic world's ground truth.

``gt_visible`` comes from the camera's own depth image and ``gt_uv`` from the true pose at each
camera stamp, both independent of the correspondence code.
"""
import dataclasses
import pathlib
import sys

import numpy as np
import pytest

from cmkd_ros.projection import CorrespondenceConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'))
from measure_correspondence import pixel_errors, visibility_scores  # noqa: E402


@pytest.fixture(scope='module')
def frames():
    from cmkd_ros.sim import SimWorld
    cams = {'count': 2, 'width': 480, 'height': 270, 'yaw_deg': [0.0, 100.0]}
    return [SimWorld({'seed': 3, 'cameras': cams}).frame(4),
            SimWorld({'seed': 11, 'cameras': cams}).frame(9)]


def test_occlusion_test_improves_precision(frames):
    for frame in frames:
        assert (frame.gt_in_view & ~frame.gt_visible).sum() > 50     # occlusion exists
    base = CorrespondenceConfig()
    without = visibility_scores(frames, dataclasses.replace(base, occlusion=False))
    with_test = visibility_scores(frames, base)
    assert without['recall'] > 0.999              # geometry alone keeps every visible point
    # the test removes most hidden pairs: false positives drop by more than half
    assert 1 - with_test['precision'] < 0.5 * (1 - without['precision'])
    assert with_test['precision'] > 0.985
    assert with_test['recall'] > 0.98


def test_expert_overrides_replace_the_inferred_scan_pattern(frames):
    # the default sensor's own numbers (1.33 deg beams, 0.35 deg azimuth) behave like the
    # inferred pattern; a beam spacing four times too coarse hides visible points
    base = CorrespondenceConfig()
    inferred = visibility_scores(frames, base)
    exact = visibility_scores(frames, dataclasses.replace(
        base, occlusion_beam_spacing_deg=41.34 / 31, occlusion_azimuth_step_deg=0.35))
    coarse = visibility_scores(frames, dataclasses.replace(base, occlusion_beam_spacing_deg=5.3))
    assert abs(exact['recall'] - inferred['recall']) < 0.002
    assert abs(exact['precision'] - inferred['precision']) < 0.002
    assert coarse['recall'] < inferred['recall'] - 0.01


def test_motion_compensation_reduces_pixel_error(frames):
    base = CorrespondenceConfig(occlusion=False)
    raw = pixel_errors(frames, dataclasses.replace(base, motion_compensation=False))
    comp = pixel_errors(frames, base)
    assert raw.size > 5000 and comp.size > 5000
    assert raw.mean() > 0.5                       # the ego moves between point and camera
    assert comp.mean() < 0.05 and np.percentile(comp, 99) < 0.2
    assert comp.mean() < raw.mean() / 20
