"""What the launch files in ``launch/`` share.

The ROS 2 ``launch`` package is imported only inside the functions that build launch actions,
so this module (and its pure parts, which the tests exercise) imports without ROS.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

PROFILE_VARIABLES = ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE')
# Distributions shipping Fast DDS 2.x, which reads only FASTRTPS_...; Fast DDS 3 (Kilted on)
# reads FASTDDS_... and warns that FASTRTPS_... is deprecated.
FASTDDS2_DISTROS = ('humble', 'iron', 'jazzy')

_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def fastdds_major_version(env: Mapping[str, str] | None = None) -> int | None:
    """Major version of the Fast DDS library under the ament prefixes (``AMENT_PREFIX_PATH``,
    the same for PyPI wheels in a venv and for /opt/ros): 3 for libfastdds.so.3, 2 for
    libfastrtps.so.2; None when neither is found there."""
    env = os.environ if env is None else env
    for prefix in filter(None, env.get('AMENT_PREFIX_PATH', '').split(os.pathsep)):
        try:
            names = os.listdir(os.path.join(prefix, 'lib'))
        except OSError:
            continue
        if any(n.startswith('libfastdds.so.3') for n in names):
            return 3
        if any(n.startswith('libfastrtps.so.2') for n in names):
            return 2
    return None


def profile_variables(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The Fast DDS profile variable that the installed Fast DDS reads: found from its library
    (:func:`fastdds_major_version`), else from ``ROS_DISTRO``. Only that one is set: each
    version ignores the other's name."""
    env = os.environ if env is None else env
    major = fastdds_major_version(env)
    if major is None:
        major = 2 if env.get('ROS_DISTRO') in FASTDDS2_DISTROS else 3
    return PROFILE_VARIABLES[:1] if major == 2 else PROFILE_VARIABLES[1:]


def given_parameters(values: dict[str, str], optional: dict[str, tuple[str, type]]) -> dict:
    """Node parameter overrides from launch argument values, for the arguments that were given.

    ``optional`` maps a launch argument to ``(parameter name, bool | str | list)`` (a list of
    strings is given as ``a,b`` or ``[a, b]``). An argument left
    empty is not passed, so the params file's value (or the node's default) stays: launch
    arguments with a default would otherwise always override the params file.
    """
    overrides = {}
    for argument, (parameter, kind) in optional.items():
        text = values.get(argument, '').strip()
        if not text:
            continue
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(f'launch argument {argument}: expected true or false, got '
                                 f'{text!r}')
            overrides[parameter] = text.lower() in _TRUE
        elif kind is str:
            overrides[parameter] = text
        elif kind is list:  # 'a,b' or '[a, b]' -> ['a', 'b']
            overrides[parameter] = [w for w in text.strip('[]').replace(',', ' ').split() if w]
        else:
            raise TypeError(f'{argument}: unsupported parameter type {kind!r}')
    return overrides


def optional_parameters(context, optional: dict[str, tuple[str, type]]) -> dict:
    """:func:`given_parameters` of the launch arguments' values in a launch ``context``."""
    from launch.substitutions import LaunchConfiguration
    return given_parameters({a: LaunchConfiguration(a).perform(context) for a in optional},
                            optional)


def fastdds_profile(context) -> list:
    """Actions pointing Fast DDS at the ``fastdds_profile`` launch argument ('' = leave the
    environment as it is); for ``OpaqueFunction(function=fastdds_profile)``."""
    from launch.actions import SetEnvironmentVariable
    from launch.substitutions import LaunchConfiguration
    profile = LaunchConfiguration('fastdds_profile').perform(context)
    if not profile:
        return []
    return [SetEnvironmentVariable(var, profile)
            for var in profile_variables()]


_CHECKED = 'cmkd_launch_arguments_checked'


def unknown_arguments(given: list[str], declared: set[str]) -> list[str]:
    """Names of the ``name:=value`` words in ``given`` that are not in ``declared``."""
    return sorted({word.split(':=', 1)[0] for word in given if ':=' in word} - set(declared))


def reject_unknown_arguments(declared: list[str]):
    """An action failing the launch when the command line names an argument not in ``declared``
    (launch ignores unknown ones, so a typo such as ``checkpiont:=`` would go unnoticed).

    Only the launch file given on the command line checks: one that it includes sees the same
    command line and leaves it alone.
    """
    from launch.actions import OpaqueFunction

    def check(context):
        if context.launch_configurations.get(_CHECKED):
            return []
        context.launch_configurations[_CHECKED] = 'true'
        unknown = unknown_arguments(list(context.argv), set(declared))
        if unknown:
            raise RuntimeError(f'unknown launch argument(s) {", ".join(unknown)}; this file '
                               f'takes {", ".join(sorted(declared))} (see --show-args)')
        return []
    return OpaqueFunction(function=check)


def fail_launch_if_exits_with_error(action):
    """An event handler failing the launch (exit status 1) when the process ``action`` exits
    with an error status: a node that stops at start-up (a bad checkpoint, calibration or
    parameter) must not leave ``ros2 launch`` reporting success. The node's own log line says
    why; this adds one line naming the node."""
    from launch.actions import RegisterEventHandler
    from launch.event_handlers import OnProcessExit

    def on_exit(event, context):
        if event.returncode and event.returncode > 0 and not context.is_shutdown:
            raise RuntimeError(f'{event.action.name} exited with status {event.returncode} '
                               '(its error is logged above)')
        return []
    return RegisterEventHandler(OnProcessExit(target_action=action, on_exit=on_exit))
