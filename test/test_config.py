"""The shared config schema: defaults, YAML + overrides, and errors that name the field."""
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from cmkd_ros.config import ConfigError, build, describe, load, setting, to_dict


@dataclass(frozen=True)
class Inner:
    size: float = setting(0.1, 'voxel size in metres', gt=0)
    widths: tuple[int, ...] = setting((32, 64), 'channel widths', ge=1)


@dataclass(frozen=True)
class Outer:
    name: str = setting('run', 'experiment name')
    mode: Literal['fskd', 'udakd'] = setting('fskd', 'method')
    steps: int = setting(10, 'optimizer steps', ge=1)
    inner: Inner = setting(default_factory=Inner, help='nested section')
    path: str | None = setting(None, 'optional path')
    extra: dict[str, Any] = setting(default_factory=lambda: {'arch': 'small', 'width': 32},
                                    help='overrides of another config')


def test_defaults_round_trip_through_to_dict():
    cfg = build(Outer)
    assert cfg.inner.widths == (32, 64)
    assert build(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize('data, field', [
    ({'steps': 0}, 'steps'),
    ({'steps': 1.5}, 'steps'),
    ({'mode': 'other'}, 'mode'),
    ({'inner': {'size': -1}}, 'inner.size'),
    ({'inner': {'widths': [32, 0]}}, 'inner.widths'),
    ({'inner': {'widths': 'abc'}}, 'inner.widths'),
    ({'inner': {'sise': 0.2}}, 'inner.sise'),
    ({'name': 3}, 'name'),
])
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
        build(Outer, data)


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('steps: 5\ninner:\n  size: 0.2\n')
    cfg = load(Outer, str(path), ['inner.widths=[8, 16, 32]', 'mode=udakd'])
    got = (cfg.steps, cfg.inner.size, cfg.inner.widths, cfg.mode)
    assert got == (5, 0.2, (8, 16, 32), 'udakd')
    # An empty value is the empty string (clearing a path); null is None.
    cleared = load(Outer, None, ['name=', 'path=null'])
    assert (cleared.name, cleared.path) == ('', None)
    with pytest.raises(ConfigError, match='steps'):
        load(Outer, None, ['steps='])
    with pytest.raises(ConfigError, match='not found'):
        load(Outer, str(tmp_path / 'missing.yaml'))
    (tmp_path / 'bad.yaml').write_text('- a list\n')
    with pytest.raises(ConfigError, match='mapping'):
        load(Outer, str(tmp_path / 'bad.yaml'))


def test_mapping_settings_merge_into_their_defaults(tmp_path):
    """``extra.width=0`` changes one key and keeps the other defaults (it once replaced the
    whole mapping, silently training another network)."""
    assert load(Outer, None, ['extra.width=0']).extra == {'arch': 'small', 'width': 0}
    path = tmp_path / 'c.yaml'
    path.write_text('extra:\n  depth: 3\n')
    assert load(Outer, str(path)).extra == {'arch': 'small', 'width': 32, 'depth': 3}
    assert build(Outer).extra == {'arch': 'small', 'width': 32}


@dataclass(frozen=True)
class Required:
    options: dict[str, Any] = setting(help='a mapping without default')
    count: int = setting(1, 'with a default')


def test_required_settings():
    assert build(Required, {'options': {'a': 1}}).options == {'a': 1}
    with pytest.raises(ConfigError, match='options: required'):
        build(Required, {'count': 2})


def test_describe_lists_nested_fields_with_help():
    rows = {name: (tp, default, text) for name, tp, default, text in describe(Outer)}
    assert rows['inner.size'] == ('float', 0.1, 'voxel size in metres')
    assert rows['steps'][1] == 10
