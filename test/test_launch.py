"""Launch files and parameter files: static checks of what a real launch does not exercise.

test_ros2_launch.py runs every launch file under the real ``ros2 launch``. What such a run does
not catch, checked here from the source: a declared argument that nothing uses, a parameter that
the node does not have (ROS accepts and ignores it), a remapped private topic that the node never
uses (the remapping silently does nothing), an argument passed to an included file that it does
not declare, a ``cmkd`` option on a branch that the tests do not launch, and a launch argument
typed unlike the node parameter it sets.
"""
import argparse
import ast
import importlib
import pathlib

import pytest

from cmkd_ros.tools import cli
from cmkd_ros.config import ConfigError, build

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((REPO / 'launch').glob('*.launch.py'))
NODE_CONFIGS = {
    'segment_node': ('cmkd_ros.pipelines.segment', 'SegmentNodeConfig',
                     {'checkpoint': 'student.pt'}),
    'collect_node': ('cmkd_ros.pipelines.collect', 'CollectNodeConfig',
                     {'calibration_file': 'rig.yaml'}),
}
ROS_BUILTIN_PARAMETERS = {'use_sim_time'}


def _console_scripts() -> dict[str, str]:
    """console_scripts of setup.py: name -> 'module:function' (read with ast)."""
    tree = ast.parse((REPO / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == 'console_scripts':
                    entries = [ast.literal_eval(e) for e in value.elts]
                    return {e.split('=')[0].strip(): e.split('=')[1].strip() for e in entries}
    raise AssertionError('setup.py has no console_scripts')


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, 'attr', '')


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _call_name(n) == name]


def _kwarg(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _first_str(call: ast.Call) -> str:
    arg = call.args[0]
    assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), ast.dump(arg)
    return arg.value


def _param_names(executable: str) -> set[str]:
    from cmkd_ros.nodes.ros_io import param_fields
    module, cls, _ = NODE_CONFIGS[executable]
    return {f.name for f in param_fields(getattr(importlib.import_module(module), cls))}


def _subcommand_options(name: str) -> set[str]:
    module = importlib.import_module(cli.SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return {opt for action in parser._actions for opt in action.option_strings}


def check_launch_file(path: pathlib.Path) -> dict:
    """Statically check one launch file; returns what it names (for the assertions below)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    assert any(isinstance(n, ast.FunctionDef) and n.name == 'generate_launch_description'
               for n in tree.body), f'{path.name}: no generate_launch_description()'
    declared = [_first_str(c) for c in _calls(tree, 'DeclareLaunchArgument')]
    assert len(declared) == len(set(declared)), f'{path.name}: argument declared twice'
    used = {_first_str(c) for c in _calls(tree, 'LaunchConfiguration')}
    # OPTIONAL_PARAMETERS = {argument: (parameter, type)}: passed only when given
    optional = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == 'OPTIONAL_PARAMETERS'
                                                for t in node.targets):
            optional = {ast.literal_eval(k): (ast.literal_eval(v.elts[0]), v.elts[1].id)
                        for k, v in zip(node.value.keys, node.value.values)}
    assert all(kind in ('bool', 'str', 'list') for _, kind in optional.values()), optional
    used |= set(optional)
    # cmkd_ros.nodes.launch_support.fastdds_profile reads the fastdds_profile argument
    if any(getattr(_kwarg(c, 'function'), 'id', '') == 'fastdds_profile'
           for c in _calls(tree, 'OpaqueFunction')):
        used.add('fastdds_profile')
    assert used <= set(declared), f'{path.name}: undeclared {sorted(used - set(declared))}'
    assert set(declared) <= used, f'{path.name}: unused {sorted(set(declared) - used)}'
    # files named as string constants (PathJoinSubstitution([share, 'config', 'x.yaml']))
    files = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and n.value.endswith(('.yaml', '.xml'))]
    for name in files:
        assert (REPO / 'config' / name).is_file(), f'{path.name}: config/{name} missing'
    scripts = _console_scripts()
    executables = []
    for call in _calls(tree, 'Node'):
        package = ast.literal_eval(_kwarg(call, 'package'))
        executable = ast.literal_eval(_kwarg(call, 'executable'))
        assert package == 'cmkd_ros'
        assert executable in scripts, f'{path.name}: {executable} is not a console script'
        module, func = scripts[executable].split(':')
        assert callable(getattr(importlib.import_module(module), func))
        executables.append(executable)
        # parameters: every key of the inline dict is a node parameter
        known = _param_names(executable) | ROS_BUILTIN_PARAMETERS
        for item in _kwarg(call, 'parameters').elts:
            if isinstance(item, ast.Dict):
                keys = {ast.literal_eval(k) for k in item.keys}
                assert keys <= known, f'{path.name}: unknown parameters {sorted(keys - known)}'
        if optional:
            keys = {parameter for parameter, _ in optional.values()}
            assert keys <= known, f'{path.name}: unknown parameters {sorted(keys - known)}'
        # remappings: private topics the node really uses
        source = (REPO / (module.replace('.', '/') + '.py')).read_text()
        for pair in _kwarg(call, 'remappings').elts:
            topic = ast.literal_eval(pair.elts[0])
            assert f"'{topic}'" in source, f'{path.name}: {executable} has no topic {topic}'
    # IncludeLaunchDescription(... [share, 'launch', 'x.launch.py'] ..., launch_arguments=
    # {...}.items()): the file exists and declares every argument passed to it
    included = []
    for call in _calls(tree, 'IncludeLaunchDescription'):
        names = [n.value for n in ast.walk(call) if isinstance(n, ast.Constant)
                 and isinstance(n.value, str) and n.value.endswith('.launch.py')]
        assert len(names) == 1 and (REPO / 'launch' / names[0]).is_file(), \
            f'{path.name}: included launch file {names} missing'
        target = check_launch_file(REPO / 'launch' / names[0])
        passed = {ast.literal_eval(k) for k in _kwarg(call, 'launch_arguments').func.value.keys}
        unknown = passed - set(target['declared'])
        assert not unknown, f'{path.name}: {names[0]} declares no {sorted(unknown)}'
        included.append(names[0])
        executables += target['executables']
    # ExecuteProcess(cmd=[python, '-m', 'cmkd_ros.tools.cli', SUB, '--opt', ...]): all exist
    for call in _calls(tree, 'ExecuteProcess'):
        cmd = _kwarg(call, 'cmd').elts
        # a word is a constant, a substitution, or a list joined into one word ('--x=', value)
        words = [c.value if isinstance(c, ast.Constant) else
                 c.elts[0].value.split('=')[0] if isinstance(c, ast.List) else None
                 for c in cmd]
        assert words[1:3] == ['-m', 'cmkd_ros.tools.cli'] and words[3] in cli.SUBCOMMANDS, words[:4]
        options = _subcommand_options(words[3])
        for word in words[4:]:
            if isinstance(word, str) and word.startswith('--'):
                assert word in options, f'{path.name}: cmkd {words[3]} has no option {word}'
    return {'declared': declared, 'executables': executables, 'files': files,
            'optional': optional, 'included': included}


def test_static_check_of_every_launch_file():
    names = {p.name for p in LAUNCH_FILES}
    assert names == {'segment.launch.py', 'collect.launch.py', 'replay_evaluate.launch.py'}
    found = {p.name: check_launch_file(p) for p in LAUNCH_FILES}
    for name, info in found.items():
        for arg in ('params_file', 'use_sim_time', 'fastdds_profile'):
            assert arg in info['declared'], f'{name} lacks the {arg} argument'
        assert 'fastdds_shm.xml' in info['files']
    assert found['segment.launch.py']['executables'] == ['segment_node']
    assert found['collect.launch.py']['executables'] == ['collect_node']
    assert 'checkpoint' in found['replay_evaluate.launch.py']['declared']
    assert found['replay_evaluate.launch.py']['included'] == ['segment.launch.py']


BREAKAGES = [  # (launch file, text, replaced by, expected complaint)
    ('segment', "executable='segment_node'", "executable='no_such_node'",
     'no_such_node is not a console script'),
    ('segment', "LaunchConfiguration('checkpoint')", "LaunchConfiguration('checkpont')",
     'undeclared'),
    ('segment', "'segment_node.param.yaml'", "'missing.param.yaml'",
     'missing.param.yaml missing'),
    ('segment', "'checkpoint': ParameterValue", "'checkpont': ParameterValue",
     'unknown parameters'),
    ('segment', "'precision': ('precision', str)", "'precision': ('precission', str)",
     r"unknown parameters \['precission'\]"),
    ('replay_evaluate', "'--clock'", "'--clok'", 'has no option --clok'),
    ('replay_evaluate', "['--device=',", "['--devise=',", 'has no option --devise'),
    ('replay_evaluate', "'output_pointcloud': LaunchConfiguration",
     "'output_cloud': LaunchConfiguration", r"segment.launch.py declares no \['output_cloud'\]"),
]


@pytest.mark.parametrize('name, text, replacement, complaint', BREAKAGES)
def test_static_check_catches_a_broken_launch_file(tmp_path, name, text, replacement, complaint):
    good = (REPO / 'launch' / f'{name}.launch.py').read_text()
    assert text in good
    bad = tmp_path / f'bad_{name}.launch.py'
    bad.write_text(good.replace(text, replacement))
    with pytest.raises(AssertionError, match=complaint):
        check_launch_file(bad)


def _yaml_parameters(path: pathlib.Path) -> dict:
    """Parameters of a ros__parameters file as ROS itself parses it (rcl_yaml_param_parser)."""
    from rclpy.parameter import Parameter, parameter_dict_from_yaml_file
    raw = parameter_dict_from_yaml_file(str(path), use_wildcard=True)
    return {name: Parameter.from_parameter_msg(msg).value for name, msg in raw.items()}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        node = out
        parts = name.split('.')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = list(value) if isinstance(value, (list, tuple)) else value
    return out


@pytest.mark.parametrize('executable', sorted(NODE_CONFIGS))
def test_param_files_hold_only_node_parameters_and_build_a_valid_config(executable):
    path = REPO / 'config' / f'{executable}.param.yaml'
    assert path.read_text().lstrip('# \n').find('/**:') >= 0
    params = _yaml_parameters(path)
    names = _param_names(executable)
    assert set(params) <= names, f'unknown in {path.name}: {sorted(set(params) - names)}'
    module, cls, required = NODE_CONFIGS[executable]
    config_cls = getattr(importlib.import_module(module), cls)
    config = build(config_cls, _nested({**params, **required}))
    # the file's values are the ones built (spot check of nested and top-level fields)
    for name, value in params.items():
        if name in required:
            continue
        obj = config
        for part in name.split('.'):
            obj = getattr(obj, part)
        assert (list(obj) if isinstance(obj, tuple) else obj) == (
            list(value) if isinstance(value, (list, tuple)) else value), name
    # the required value is really required: the file alone does not build
    with pytest.raises(ConfigError, match=next(iter(required))):
        build(config_cls, _nested(params))


def test_node_docs_list_every_parameter_and_topic():
    text = (REPO / 'docs' / 'nodes.md').read_text()
    for executable in NODE_CONFIGS:
        for name in _param_names(executable):
            if not name.startswith('correspondence.'):
                assert f'`{name}`' in text, f'docs/nodes.md does not document {name}'
    for topic in ('~/input/pointcloud', '~/output/pointcloud', '~/debug/processing_time_ms',
                  '~/output/overlay', '~/input/odom', '/diagnostics'):
        assert f'`{topic}`' in text
    assert 'FASTDDS_DEFAULT_PROFILES_FILE' in text and 'fastdds_shm.xml' in text


def test_launch_arguments_left_empty_keep_the_params_file_values():
    from cmkd_ros.nodes.launch_support import given_parameters
    optional = {'record': ('record.enabled', bool), 'output_dir': ('record.output_dir', str),
                'device': ('device', str)}
    assert given_parameters({'record': '', 'output_dir': ' ', 'device': ''}, optional) == {}
    assert given_parameters({'record': 'True', 'output_dir': '/data/p'}, optional) == {
        'record.enabled': True, 'record.output_dir': '/data/p'}
    assert given_parameters({'record': 'false', 'device': 'cuda:0'}, optional) == {
        'record.enabled': False, 'device': 'cuda:0'}
    cameras = {'cameras': ('cameras', list)}
    assert given_parameters({'cameras': 'front,back_left'}, cameras) == given_parameters(
        {'cameras': '[front, back_left]'}, cameras) == {'cameras': ['front', 'back_left']}
    with pytest.raises(ValueError, match='record: expected true or false'):
        given_parameters({'record': 'maybe'}, optional)


@pytest.mark.parametrize('executable', sorted(NODE_CONFIGS))
def test_optional_launch_arguments_are_typed_like_the_node_parameters(executable):
    """OPTIONAL_PARAMETERS' types match the config schema (a bool passed as a string would be
    rejected by the node)."""
    from rcl_interfaces.msg import ParameterType

    from cmkd_ros.nodes.ros_io import param_fields
    module, cls, _ = NODE_CONFIGS[executable]
    fields = {f.name: f for f in param_fields(getattr(importlib.import_module(module), cls))}
    ros_types = {'bool': ParameterType.PARAMETER_BOOL, 'str': ParameterType.PARAMETER_STRING,
                 'list': ParameterType.PARAMETER_STRING_ARRAY}
    checked = 0
    for path in LAUNCH_FILES:
        info = check_launch_file(path)
        if executable not in info['executables']:
            continue
        for parameter, kind in info['optional'].values():
            assert fields[parameter].ros_type == ros_types[kind], (path.name, parameter)
            checked += 1
    assert checked >= 2
