"""Class maps: built-in maps, validation, colors, serialization."""
import numpy as np
import pytest

from cmkd_ros.classes import (NUSCENES_LIDARSEG16, SEMANTICKITTI19, SYNTHETIC, ClassMap,
                              ClassMapError, get_class_map)


def test_builtin_maps_have_the_standard_classes_in_order():
    assert len(NUSCENES_LIDARSEG16) == 16 and len(SEMANTICKITTI19) == 19
    assert NUSCENES_LIDARSEG16.names[0] == 'barrier' and NUSCENES_LIDARSEG16.names[-1] == \
        'vegetation'
    assert SEMANTICKITTI19.names[0] == 'car' and SEMANTICKITTI19.names[-1] == 'traffic-sign'
    assert len(SYNTHETIC) >= 10
    for name in ('road', 'sidewalk', 'terrain', 'building', 'vegetation', 'car', 'truck',
                 'pedestrian', 'pole', 'barrier'):
        assert name in SYNTHETIC.names
    for cmap in (SYNTHETIC, NUSCENES_LIDARSEG16, SEMANTICKITTI19):
        assert len(set(cmap.colors)) == len(cmap.colors)       # distinguishable colors
        assert cmap.ignore_index == 255
    assert get_class_map('semantickitti19') is SEMANTICKITTI19
    with pytest.raises(ClassMapError, match='unknown class map'):
        get_class_map('cityscapes')


def test_colorize_maps_ids_and_ignore():
    labels = np.array([[0, 1], [255, 200]], np.uint8)
    rgb = SYNTHETIC.colorize(labels)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == SYNTHETIC.colors[0] and tuple(rgb[0, 1]) == SYNTHETIC.colors[1]
    assert tuple(rgb[1, 0]) == (0, 0, 0) and tuple(rgb[1, 1]) == (0, 0, 0)
    assert SYNTHETIC.colorize(np.array([-1, 3], np.int64))[0].tolist() == [0, 0, 0]
    with pytest.raises(ClassMapError, match='integers'):
        SYNTHETIC.colorize(np.array([0.5]))


def test_round_trip_and_validation():
    assert ClassMap.from_dict(SEMANTICKITTI19.to_dict()) == SEMANTICKITTI19
    assert SYNTHETIC.index('pole') == SYNTHETIC.names.index('pole')
    with pytest.raises(ClassMapError, match='no class named'):
        SYNTHETIC.index('tram')
    with pytest.raises(ClassMapError, match='unique'):
        ClassMap(('a', 'a'), ((0, 0, 0), (1, 1, 1)))
    with pytest.raises(ClassMapError, match='colors'):
        ClassMap(('a', 'b'), ((0, 0, 0),))
    with pytest.raises(ClassMapError, match='RGB'):
        ClassMap(('a',), ((0, 0, 300),))
    with pytest.raises(ClassMapError, match='ignore_index'):
        ClassMap(('a', 'b'), ((0, 0, 0), (1, 1, 1)), ignore_index=1)
    with pytest.raises(ClassMapError, match='unknown class map field'):
        ClassMap.from_dict({'names': ['a'], 'colors': [[0, 0, 0]], 'palette': 1})
