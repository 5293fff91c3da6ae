"""Pictures of a labeled scan: a bird's-eye view next to the ground truth, and one camera image
with the labeled points drawn over it. ROS-free (matplotlib's Agg backend, OpenCV)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _colors(labels: np.ndarray, class_colors: np.ndarray) -> np.ndarray:
    """(N, 3) float RGB in 0..1; labels outside the class list (e.g. 255) are gray."""
    table = np.concatenate([np.asarray(class_colors, np.float64) / 255.0,
                            np.full((1, 3), 0.6)])
    index = np.where((labels >= 0) & (labels < len(class_colors)), labels, len(class_colors))
    return table[index.astype(np.int64)]


def save_bev_comparison(path: str, xyz: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                        seen: np.ndarray, class_names: Sequence[str],
                        class_colors: np.ndarray, *, extent_m: float = 40.0,
                        title: str = '') -> None:
    """Top view (LiDAR frame x forward up the page, y left) of one scan, ground truth beside
    the student's labels. Points that no camera sees (``seen`` False: only the LiDAR student
    labels them) are drawn pale in both panels.

    xyz (N, 3) LiDAR frame; truth, predicted (N,) class ids; seen (N,) bool.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    keep = (np.abs(xyz[:, 0]) < extent_m) & (np.abs(xyz[:, 1]) < extent_m)
    x, y = xyz[keep, 0], xyz[keep, 1]
    seen = np.asarray(seen, bool)[keep]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.8), sharex=True, sharey=True)
    accuracy = float(np.mean(truth[keep] == predicted[keep])) if keep.any() else float('nan')
    for ax, labels, name in ((axes[0], truth, 'ground truth'),
                             (axes[1], predicted, f'student (point accuracy {accuracy:.0%})')):
        rgb = _colors(np.asarray(labels)[keep], class_colors)
        rgb[~seen] = 0.55 * rgb[~seen] + 0.45     # pale: no camera sees them
        order = np.argsort(seen, kind='stable')   # seen points on top
        # plot -y on the horizontal axis so that left is left as seen from above
        ax.scatter(-y[order], x[order], c=rgb[order], s=3, linewidths=0)
        ax.set_title(name)
        ax.set_aspect('equal')
        ax.set_xlim(-extent_m, extent_m)
        ax.set_ylim(-extent_m, extent_m)
        ax.set_xlabel('left <- y (m) -> right')
    axes[0].set_ylabel('x forward (m)')
    present = np.unique(np.concatenate([truth[keep], predicted[keep]]))
    handles = [Patch(color=np.asarray(class_colors[c]) / 255.0, label=class_names[c])
               for c in present if 0 <= c < len(class_names)]
    handles.append(Patch(color=(0.85, 0.85, 0.85), label='pale: no camera sees it'))
    fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 8), fontsize=8,
               frameon=False)
    fig.suptitle(title or 'held-out scan, bird\'s-eye view')
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_points(image: np.ndarray, uv: np.ndarray, colors: np.ndarray, depth: np.ndarray,
                radius: int = 2) -> np.ndarray:
    """Copy of RGB ``image`` with discs at ``uv`` (M, 2); near points drawn over far ones."""
    out = image.copy()
    H, W = out.shape[:2]
    order = np.argsort(-depth, kind='stable')                # far first, near last
    px = np.rint(uv[order]).astype(np.int64)
    col = colors[order]
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dx * dx + dy * dy <= radius * radius + radius]
    # one vectorized assignment per disc offset; for repeated pixels the last (nearest) wins
    for dx, dy in offsets:
        u, v = px[:, 0] + dx, px[:, 1] + dy
        ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        out[v[ok], u[ok]] = col[ok]
    return out


def save_camera_labels(path: str, image: np.ndarray, uv: np.ndarray, labels: np.ndarray,
                       depth: np.ndarray, class_colors: np.ndarray, radius: int = 2,
                       min_width: int = 960) -> None:
    """RGB ``image`` (H, W, 3) with points at pixels ``uv`` (M, 2) colored by ``labels`` (M,),
    nearer points over farther ones (``depth`` (M,) metres), written as PNG. Images narrower
    than ``min_width`` are enlarged by a whole factor (pixels kept sharp) so that the points
    stay readable."""
    import cv2

    scale = max(1, -(-min_width // image.shape[1]))
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        uv = (np.asarray(uv, dtype=np.float64) + 0.5) * scale - 0.5
    colors = (_colors(np.asarray(labels), class_colors) * 255).astype(np.uint8)
    drawn = draw_points(image, uv, colors, depth, radius=radius * scale // 2 + (scale > 1))
    if not cv2.imwrite(path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f'cannot write {path}')
