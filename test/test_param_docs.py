"""The parameter tables of the docs are generated from the config schema and kept up to date."""
import dataclasses
import pathlib

import pytest

from cmkd_ros.config import setting
from cmkd_ros.tools import param_docs

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = setting(2.0, 'publish rate (Hz)', gt=0.0, le=30.0)


@dataclasses.dataclass(frozen=True)
class Demo:
    mode: str = setting('raw', 'input | output kind', choices=('raw', 'compressed'))
    names: tuple[str, ...] = setting((), 'camera names')
    inner: Inner = setting(default_factory=Inner)


def test_the_docs_tables_match_the_config_schema():
    stale = param_docs.stale_docs(REPO)
    assert not stale, (f'parameter tables in {", ".join(stale)} are out of date with the config '
                       f'schema: run {param_docs.COMMAND}')


def test_every_table_appears_once_and_every_node_parameter_is_listed():
    found = [name for path in param_docs.doc_files(REPO)
             for name in param_docs.tables_in(path.read_text(encoding='utf-8'))]
    assert sorted(found) == sorted(param_docs.TABLES)
    nodes = (REPO / 'docs' / 'nodes.md').read_text(encoding='utf-8')
    # ROS types and the runtime column as the node declares them
    assert '| `range_min` | double | `0.0` | >= 0.0 | yes |' in nodes
    assert '| `checkpoint` | string | `""` |  |  |' in nodes
    assert '| `correspondence.min_depth` | double |' in nodes
    assert '| `record.enabled` | bool | `false` |  | yes |' in nodes


def test_a_stale_table_is_found_rewritten_and_unknown_tables_refused(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setitem(param_docs.TABLES, 'demo', param_docs.Table(__name__, 'Demo'))
    (tmp_path / 'docs').mkdir()
    doc = tmp_path / 'docs' / 'demo.md'
    doc.write_text('# Demo\n\n<!-- params:demo -->\n| old table |\n<!-- /params -->\n\nafter\n')
    assert param_docs.main(['--root', str(tmp_path)]) == 1
    assert param_docs.COMMAND in capsys.readouterr().err
    assert param_docs.main(['--root', str(tmp_path), '--write']) == 0
    text = doc.read_text()
    assert 'old table' not in text and text.endswith('<!-- /params -->\n\nafter\n')
    assert '| `mode` | str | `raw` | one of raw, compressed | input \\| output kind |' in text
    assert '| `names` | list of str | `[]` |  | camera names |' in text
    assert '| `inner.rate` | float | `2.0` | > 0.0; <= 30.0 | publish rate (Hz) |' in text
    assert param_docs.stale_docs(tmp_path) == []
    assert param_docs.main(['--root', str(tmp_path)]) == 0
    doc.write_text(text.replace('params:demo', 'params:nothing'))
    with pytest.raises(ValueError, match="unknown parameter table 'nothing'"):
        param_docs.stale_docs(tmp_path)
