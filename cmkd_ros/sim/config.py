"""Validated settings of the synthetic sensor world (``SimConfig`` and its sections).

Build with ``cmkd_ros.config.build(SimConfig, mapping)`` or ``load(SimConfig, yaml_path)``;
every field carries a help text and bounds, and bad values raise ``ConfigError`` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cmkd_ros.config import ConfigError, setting


def _steps(start: float, step: float, count: int) -> tuple[float, ...]:
    return tuple(round(start + step * i, 3) for i in range(count))


# Sensor presets from the manufacturers' public spec sheets (10 Hz modes). Ring order follows
# the usual ROS drivers: Velodyne rings count up from the lowest beam, Ouster and Hesai channels
# down from the highest. 'default' is the project's original sensor (HDL-32E geometry, 0.35 deg).
LIDAR_PRESETS: dict[str, dict] = {
    'default': {},
    # Velodyne HDL-32E: 32 beams evenly over +10.67..-30.67 deg (1.33 deg), 0.16 deg at 10 Hz
    'hdl32e': {'beams': 32, 'elevation_min_deg': -30.67, 'elevation_max_deg': 10.67,
               'horizontal_resolution_deg': 0.16, 'max_range_m': 100.0},
    # Velodyne VLP-32C (Ultra Puck): 32 beams over +15..-25 deg, 0.33 deg apart near the
    # horizon and up to 9.4 deg at the bottom; 0.2 deg at 10 Hz
    'vlp32c': {'beams': 32, 'elevation_angles_deg': (
        -25.0, -15.639, -11.31, -8.843, -7.254, -6.148, -5.333, -4.667, -4.0, -3.667, -3.333,
        -3.0, -2.667, -2.333, -2.0, -1.667, -1.333, -1.0, -0.667, -0.333, 0.0, 0.333, 0.667,
        1.0, 1.333, 1.667, 2.333, 3.333, 4.667, 7.0, 10.333, 15.0),
        'horizontal_resolution_deg': 0.2, 'max_range_m': 200.0},
    # Velodyne HDL-64E: upper block 32 beams +2..-8.33 deg (1/3 deg), lower block 32 beams
    # -8.83..-24.33 deg (1/2 deg); 0.17 deg at 10 Hz
    'hdl64e': {'beams': 64, 'elevation_angles_deg': _steps(-24.333, 0.5, 32)
               + _steps(-8.333, 1 / 3, 32), 'horizontal_resolution_deg': 0.17,
               'max_range_m': 120.0},
    # Hesai Pandar64: 64 channels over +15..-25 deg, 0.167 deg from +2 to -6 deg, 1 to 6 deg
    # apart above and below; 0.2 deg at 10 Hz
    'pandar64': {'beams': 64, 'elevation_angles_deg': (14.882, 11.032, 8.059, 5.057, 3.04)
                 + _steps(2.0, -1 / 6, 49) + (-7.063, -8.059, -9.06, -10.06, -11.032, -12.006,
                                               -12.974, -13.93, -18.889, -24.897),
                 'horizontal_resolution_deg': 0.2, 'max_range_m': 200.0},
    # Ouster OS1-128: 128 beams evenly over +22.5..-22.5 deg (0.35 deg), 1024 columns at 10 Hz
    'os1-128': {'beams': 128, 'elevation_angles_deg': _steps(22.5, -45.0 / 127, 128),
                'horizontal_resolution_deg': 360.0 / 1024, 'max_range_m': 120.0},
}


@dataclass(frozen=True)
class LidarConfig:
    """Spinning multi-beam LiDAR (the LiDAR frame is the ego frame)."""

    preset: str = setting('default', 'sensor whose beam table, azimuth step and range fill in '
                          'the settings not given (LIDAR_PRESETS)',
                          choices=tuple(LIDAR_PRESETS))
    beams: int = setting(32, 'number of laser beams (rings), evenly spread in elevation unless '
                         'elevation_angles_deg is given', ge=1, le=256)
    elevation_min_deg: float = setting(-30.67, 'lowest beam elevation, degrees', ge=-89.0,
                                       le=89.0)
    elevation_max_deg: float = setting(10.67, 'highest beam elevation, degrees', ge=-89.0,
                                       le=89.0)
    elevation_angles_deg: tuple[float, ...] = setting(
        (), 'explicit beam elevations in degrees (ring order); overrides min/max when not empty')
    horizontal_resolution_deg: float = setting(0.35, 'azimuth step between firings, degrees',
                                               ge=0.02, le=10.0)
    rate_hz: float = setting(10.0, 'rotation rate; one sweep per rotation', ge=1.0, le=50.0)
    clockwise: bool = setting(True, 'rotation direction seen from above (Velodyne: clockwise)')
    start_azimuth_deg: float = setting(180.0, 'azimuth where a sweep starts (180 = behind)',
                                       ge=-360.0, le=360.0)
    min_range_m: float = setting(1.0, 'returns closer than this are dropped', ge=0.0, le=10.0)
    max_range_m: float = setting(80.0, 'returns farther than this are dropped', gt=1.0,
                                 le=500.0)
    height_m: float = setting(1.8, 'LiDAR height above the road surface', gt=0.2, le=5.0)
    range_noise_std_m: float = setting(0.015, 'Gaussian range noise (1 sigma), metres', ge=0.0,
                                       le=1.0)
    dropout_probability: float = setting(0.03, 'chance that a return is lost at random',
                                         ge=0.0, lt=1.0)
    intensity_noise_std: float = setting(0.03, 'Gaussian intensity noise (intensity is 0..1)',
                                         ge=0.0, le=1.0)

    @classmethod
    def expand_settings(cls, data: Mapping) -> dict:
        """The preset's values under the keys ``data`` does not set."""
        name = data.get('preset', 'default')
        if name not in LIDAR_PRESETS:
            raise ConfigError(f'preset: {name!r} is not one of {list(LIDAR_PRESETS)}')
        return {**LIDAR_PRESETS[name], **data}

    def validate(self) -> None:
        if self.elevation_max_deg <= self.elevation_min_deg and not self.elevation_angles_deg:
            raise ConfigError(f'lidar.elevation_max_deg ({self.elevation_max_deg}) must be '
                              f'> elevation_min_deg ({self.elevation_min_deg})')
        if self.elevation_angles_deg and len(self.elevation_angles_deg) != self.beams:
            raise ConfigError(f'lidar.elevation_angles_deg has {len(self.elevation_angles_deg)} '
                              f'angles for {self.beams} beams')
        if any(abs(a) >= 89.0 for a in self.elevation_angles_deg):
            raise ConfigError('lidar.elevation_angles_deg: angles must be within +-89 degrees')
        if self.min_range_m >= self.max_range_m:
            raise ConfigError(f'lidar.min_range_m ({self.min_range_m}) must be < max_range_m '
                              f'({self.max_range_m})')


@dataclass(frozen=True)
class CamerasConfig:
    """Pinhole cameras around the car (nuScenes-like layout by default)."""

    count: int = setting(6, 'number of cameras', ge=1, le=12)
    width: int = setting(640, 'image width, pixels', ge=16, le=4096)
    height: int = setting(360, 'image height, pixels', ge=16, le=4096)
    horizontal_fov_deg: float = setting(70.0, 'horizontal field of view of the undistorted '
                                        'pinhole model, degrees', gt=10.0, lt=170.0)
    yaw_deg: tuple[float, ...] = setting(
        (), 'camera headings (0 = forward, +90 = left); empty: nuScenes-like for 6 cameras, '
        'else evenly spread')
    distortion: tuple[float, ...] = setting(
        (-0.08, 0.02, 0.0005, -0.0005, 0.0), 'plumb_bob k1 k2 p1 p2 k3 of every camera',
        length=5)
    distortion_jitter: float = setting(0.02, 'per-camera random change of k1 (seeded)',
                                       ge=0.0, le=0.2)
    mount_forward_m: float = setting(1.2, 'half length of the ellipse the cameras sit on '
                                     '(LiDAR frame x)', ge=0.0, le=5.0)
    mount_side_m: float = setting(0.6, 'half width of that ellipse (LiDAR frame y)', ge=0.0,
                                  le=3.0)
    mount_below_lidar_m: float = setting(0.35, 'how far below the LiDAR the cameras sit',
                                         ge=-2.0, le=2.0)
    mount_right_m: float = setting(0.0, 'sideways offset of every camera to its own right '
                                   '(across its view, so that the LiDAR-camera baseline has a '
                                   'parallax part)', ge=-2.0, le=2.0)
    pitch_deg: float = setting(2.0, 'downward pitch of every camera, degrees', ge=-30.0,
                               le=30.0)
    stamp_jitter_ms: float = setting(3.0, 'random change of each camera stamp (uniform +-), '
                                     'on top of the time the sweep passes its heading',
                                     ge=0.0, le=50.0)
    pixel_noise_std: float = setting(4.0, 'Gaussian sensor noise on 0..255 colors', ge=0.0,
                                     le=50.0)
    jpeg_quality: int = setting(90, 'JPEG quality for compressed images', ge=10, le=100)

    def validate(self) -> None:
        if self.yaw_deg and len(self.yaw_deg) != self.count:
            raise ConfigError(f'cameras.yaw_deg has {len(self.yaw_deg)} headings for '
                              f'{self.count} cameras')


@dataclass(frozen=True)
class SceneConfig:
    """Procedural street: densities are per 100 m of street and per side."""

    road_width_min_m: float = setting(8.0, 'narrowest road (curb to curb; parked cars on both '
                                      'sides, opposite-lane cars from 9 m)', ge=6.5, le=30.0)
    road_width_max_m: float = setting(13.0, 'widest road (curb to curb)', ge=6.5, le=40.0)
    sidewalk_width_m: float = setting(3.0, 'mean sidewalk width', ge=0.5, le=10.0)
    parked_cars: float = setting(8.0, 'parked cars per 100 m and side', ge=0.0, le=30.0)
    trucks: float = setting(1.5, 'parked trucks per 100 m and side', ge=0.0, le=10.0)
    moving_lane_cars: float = setting(2.0, 'cars standing in the opposite lane per 100 m',
                                      ge=0.0, le=20.0)
    pedestrians: float = setting(8.0, 'pedestrians per 100 m and side', ge=0.0, le=50.0)
    poles: float = setting(4.0, 'poles per 100 m and side (some carry traffic signs)', ge=0.0,
                           le=30.0)
    trees: float = setting(5.0, 'trees per 100 m and side', ge=0.0, le=30.0)
    barriers: float = setting(2.0, 'barrier groups per 100 m', ge=0.0, le=20.0)
    building_gap_probability: float = setting(0.3, 'chance of an open lot (terrain, fence, '
                                              'bushes) instead of a building', ge=0.0, le=1.0)
    cross_street_probability: float = setting(0.25, 'chance that a 60 m block ends in a cross '
                                              'street', ge=0.0, le=1.0)
    sun_elevation_min_deg: float = setting(20.0, 'lowest sun elevation (seeded)', ge=0.0,
                                           le=90.0)
    sun_elevation_max_deg: float = setting(65.0, 'highest sun elevation (seeded)', ge=0.0,
                                           le=90.0)

    def validate(self) -> None:
        if self.road_width_max_m < self.road_width_min_m:
            raise ConfigError('scene.road_width_max_m must be >= road_width_min_m')
        if self.sun_elevation_max_deg < self.sun_elevation_min_deg:
            raise ConfigError('scene.sun_elevation_max_deg must be >= sun_elevation_min_deg')


@dataclass(frozen=True)
class EgoConfig:
    """Ego trajectory along the street: varying speed and a gentle weave (curved path)."""

    speed_min_mps: float = setting(5.0, 'lowest ego speed, m/s', ge=0.0, le=60.0)
    speed_max_mps: float = setting(15.0, 'highest ego speed, m/s', ge=0.0, le=60.0)
    speed_period_s: float = setting(8.0, 'period of the speed variation, seconds', gt=0.1,
                                    le=1000.0)
    lateral_amplitude_m: float = setting(1.2, 'amplitude of the sideways weave, metres', ge=0.0,
                                         le=5.0)
    lateral_wavelength_m: float = setting(60.0, 'wavelength of the weave along the street',
                                          gt=5.0, le=10000.0)
    pose_step_ms: float = setting(2.0, 'sampling step of the exported ego poses, ms', gt=0.1,
                                  le=5.0)

    def validate(self) -> None:
        if self.speed_max_mps < self.speed_min_mps:
            raise ConfigError(f'ego.speed_max_mps ({self.speed_max_mps}) must be >= '
                              f'speed_min_mps ({self.speed_min_mps})')


@dataclass(frozen=True)
class SimConfig:
    """The whole synthetic world: seed, sensors, street and ego motion."""

    seed: int = setting(0, 'world seed: same seed and config give identical frames', ge=0)
    start_time_ns: int = setting(1_700_000_000_000_000_000, 'stamp of the first sweep, ns',
                                 ge=0)
    lidar: LidarConfig = setting(default_factory=LidarConfig, help='spinning LiDAR')
    cameras: CamerasConfig = setting(default_factory=CamerasConfig, help='camera rig')
    scene: SceneConfig = setting(default_factory=SceneConfig, help='procedural street')
    ego: EgoConfig = setting(default_factory=EgoConfig, help='ego trajectory')
