"""Pictures of labeled scans: small camera images are enlarged with the points where they were."""
import cv2
import numpy as np

from cmkd_ros.viz import draw_points, save_camera_labels


def test_small_camera_image_is_enlarged_with_points_in_place(tmp_path):
    image = np.full((24, 32, 3), 40, np.uint8)
    colors = np.array([[255, 0, 0], [0, 0, 255]])                 # class colors, 0..255
    path = str(tmp_path / 'cam.png')
    save_camera_labels(path, image, np.array([[3.0, 5.0], [20.0, 10.0]]), np.array([0, 1]),
                       np.array([4.0, 9.0]), colors, radius=1, min_width=128)
    out = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    assert out.shape == (96, 128, 3)                      # enlarged 4x, pixels kept sharp
    # pixel (u, v) of the input covers [4u, 4u + 4) of the output: the point's centre is there
    assert tuple(out[5 * 4 + 2, 3 * 4 + 2]) == (255, 0, 0)
    assert tuple(out[10 * 4 + 2, 20 * 4 + 2]) == (0, 0, 255)
    assert tuple(out[0, 0]) == (40, 40, 40)


def test_near_points_are_drawn_over_far_ones():
    image = np.zeros((10, 10, 3), np.uint8)
    colors = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
    uv = np.array([[5.0, 5.0], [5.0, 5.0]])
    near_second = draw_points(image, uv, colors, np.array([9.0, 2.0]), radius=1)
    near_first = draw_points(image, uv, colors, np.array([2.0, 9.0]), radius=1)
    assert tuple(near_second[5, 5]) == (0, 255, 0)
    assert tuple(near_first[5, 5]) == (255, 0, 0)
