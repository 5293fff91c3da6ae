"""Parameter tables of the docs, generated from the config schema (:mod:`cmkd_ros.config`).

A table sits between marker comments in a Markdown file::

    <!-- params:segment_node -->
    (generated: name, type, default, constraints, [runtime,] description)
    <!-- /params -->

``python -m cmkd_ros.tools.param_docs --write`` rewrites every table in ``docs/*.md``;
without ``--write`` it only checks them and exits 1 naming the stale files
(``test/test_param_docs.py`` does the same). Node tables give the ROS parameter types and mark
the parameters ``ros2 param set`` may change (the node's ``RUNTIME_PARAMETERS``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import re
import sys
import types
import typing
from typing import Any, NamedTuple

from cmkd_ros.config import constraints_text, to_dict


class Table(NamedTuple):
    """Where the schema of one table comes from."""

    module: str          # module holding the config dataclass
    cls: str             # the dataclass
    node: str = ''       # rclpy node module (ROS types, RUNTIME_PARAMETERS); '' for others


TABLES = {
    'segment_node': Table('cmkd_ros.pipelines.segment', 'SegmentNodeConfig',
                          'cmkd_ros.nodes.segment_node'),
    'collect_node': Table('cmkd_ros.pipelines.collect', 'CollectNodeConfig',
                          'cmkd_ros.nodes.collect_node'),
    'train': Table('offline_training.config', 'TrainConfig'),
    'train_teacher': Table('offline_training.config', 'TeacherTrainConfig'),
    'student': Table('cmkd_ros.models.student', 'StudentConfig'),
    'teacher_model': Table('cmkd_ros.models.teacher', 'TeacherConfig'),
    'experiments': Table('offline_training.experiments', 'ExperimentsConfig'),
}
REPO = pathlib.Path(__file__).resolve().parents[2]
COMMAND = 'python -m cmkd_ros.tools.param_docs --write'
BLOCK = re.compile(r'(<!-- params:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /params -->)',
                   re.S)


def _type_text(tp: Any) -> str:
    """Readable type of a field annotation: ``float``, ``list of str``, ``str or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return ' or '.join('null' if a is type(None) else _type_text(a) for a in args)
    if origin is typing.Literal:
        return _type_text(type(args[0]))
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        if len(items) > 1 and Ellipsis not in args:
            same = all(a == items[0] for a in items)
            return (f'list of {len(items)} {_type_text(items[0])}' if same else
                    'list (' + ', '.join(_type_text(a) for a in items) + ')')
        return f'list of {_type_text(items[0])}' if items else 'list'
    if origin is dict or tp is dict:
        return 'mapping'
    return getattr(tp, '__name__', str(tp))


def _value_text(value: Any) -> str:
    """A default as it is written in YAML: ``""``, ``true``, ``[0.5, 1.0]``, ``null``."""
    if isinstance(value, str):
        return f'`{value}`' if value else '`""`'
    return f'`{json.dumps(value)}`'


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def schema_rows(cls: type, prefix: str = '') -> list[tuple[str, str, Any, str, str]]:
    """(dotted name, type, default, constraints, help) of every leaf setting of ``cls``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, f'{prefix}{f.name}.'))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((prefix + f.name, _type_text(tp), to_dict(default),
                     constraints_text(f.metadata), f.metadata.get('help', '')))
    return rows


def _ros_types(cls: type) -> dict[str, str]:
    """ROS parameter type names (``double``, ``string_array``) as the node declares them."""
    from rcl_interfaces.msg import ParameterType

    from cmkd_ros.nodes.ros_io import param_fields
    names = {getattr(ParameterType, n): n[len('PARAMETER_'):].lower()
             for n in dir(ParameterType) if n.startswith('PARAMETER_')}
    return {f.name: names[f.ros_type] for f in param_fields(cls)}


def render(name: str) -> str:
    """The Markdown of table ``name`` (a key of :data:`TABLES`), with its provenance line."""
    spec = TABLES[name]
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    rows = schema_rows(cls)
    lines = [f'Generated from `{spec.module}.{spec.cls}`: edit the schema, then run',
             f'`{COMMAND}`.', '']
    if spec.node:
        node = importlib.import_module(spec.node)
        ros_types = _ros_types(cls)
        runtime = set(node.RUNTIME_PARAMETERS)
        lines += ['| Name | Type | Default | Constraints | Runtime | Description |',
                  '|---|---|---|---|---|---|']
        for key, _, default, constraints, text in rows:
            lines.append(f'| `{key}` | {ros_types[key]} | {_cell(_value_text(default))} | '
                         f'{_cell(constraints)} | {"yes" if key in runtime else ""} | '
                         f'{_cell(text)} |')
    else:
        lines += ['| Name | Type | Default | Constraints | Description |',
                  '|---|---|---|---|---|']
        for key, tp, default, constraints, text in rows:
            lines.append(f'| `{key}` | {_cell(tp)} | {_cell(_value_text(default))} | '
                         f'{_cell(constraints)} | {_cell(text)} |')
    return '\n'.join(lines) + '\n'


def regenerate(text: str, where: str = '') -> str:
    """``text`` with every marked table rewritten; an unknown table name raises ValueError."""
    def replace(match: re.Match) -> str:
        name = match.group('name')
        if name not in TABLES:
            raise ValueError(f'{where}: unknown parameter table {name!r}; known: '
                           f'{", ".join(TABLES)}')
        return match.group(1) + render(name) + match.group(4)
    return BLOCK.sub(replace, text)


def tables_in(text: str) -> list[str]:
    """Names of the marked tables in ``text``, in order."""
    return [m.group('name') for m in BLOCK.finditer(text)]


def doc_files(root: pathlib.Path = REPO) -> list[pathlib.Path]:
    """The Markdown files that may hold tables: ``docs/*.md``."""
    return sorted((root / 'docs').glob('*.md'))


def stale_docs(root: pathlib.Path = REPO, write: bool = False) -> list[str]:
    """Files of ``docs/`` whose tables differ from the schema (rewritten when ``write``)."""
    stale = []
    for path in doc_files(root):
        rel = str(path.relative_to(root))
        text = path.read_text(encoding='utf-8')
        new = regenerate(text, rel)
        if new != text:
            stale.append(rel)
            if write:
                path.write_text(new, encoding='utf-8')
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cmkd_ros.tools.param_docs',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--write', action='store_true',
                        help='rewrite the stale tables (default: only check them)')
    parser.add_argument('--root', type=pathlib.Path, default=REPO,
                        help='repository root holding docs/ (default: this checkout)')
    args = parser.parse_args(argv)
    stale = stale_docs(args.root, write=args.write)
    if args.write:
        print(f'rewrote {", ".join(stale)}' if stale else 'parameter tables up to date')
        return 0
    if stale:
        print(f'parameter tables out of date with the schema in {", ".join(stale)}: run '
              f'{COMMAND}', file=sys.stderr)
        return 1
    print('parameter tables up to date')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
