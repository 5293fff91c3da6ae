"""rclpy helpers shared by the cmkd_ros nodes: QoS, schema-driven parameters, diagnostics.

Parameters are declared from the same frozen config dataclasses the library uses
(:mod:`cmkd_ros.config`): one ROS parameter per leaf field (nested dataclasses become dotted
names, ``record.enabled``), with the field's help text as ``ParameterDescriptor`` description and
its bounds as ``additional_constraints``. Values are validated by :func:`cmkd_ros.config.build`,
so a node and a YAML-driven tool reject the same bad values with the same message.

Only APIs present since ROS 2 Humble are used.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import types
import typing
from typing import Any, Callable, Iterable

from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)

from cmkd_ros import config as cfg
from cmkd_ros.nodes.launch_support import PROFILE_VARIABLES, profile_variables


def sensor_qos(depth: int = 5) -> QoSProfile:
    """Sensor-data QoS (best effort, volatile, keep last ``depth``), as in rclpy's preset."""
    qos = QoSProfile(depth=depth)
    qos.history = HistoryPolicy.KEEP_LAST
    qos.reliability = qos_profile_sensor_data.reliability
    qos.durability = qos_profile_sensor_data.durability
    return qos


def reliable_qos(depth: int = 10) -> QoSProfile:
    """Reliable, volatile, keep last ``depth``: for low-rate outputs such as diagnostics."""
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def qos_overrides() -> Any:
    """``QoSOverridingOptions`` letting operators override a topic's QoS by parameters."""
    from rclpy.qos_overriding_options import QoSOverridingOptions
    return QoSOverridingOptions.with_default_policies()


# ----------------------------------------------------------------------------- parameters

_SCALAR_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                 float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}
_ARRAY_TYPES = {bool: ParameterType.PARAMETER_BOOL_ARRAY,
                int: ParameterType.PARAMETER_INTEGER_ARRAY,
                float: ParameterType.PARAMETER_DOUBLE_ARRAY,
                str: ParameterType.PARAMETER_STRING_ARRAY}
_PARAM_TYPE_ENUM = {ParameterType.PARAMETER_BOOL: Parameter.Type.BOOL,
                    ParameterType.PARAMETER_INTEGER: Parameter.Type.INTEGER,
                    ParameterType.PARAMETER_DOUBLE: Parameter.Type.DOUBLE,
                    ParameterType.PARAMETER_STRING: Parameter.Type.STRING,
                    ParameterType.PARAMETER_BOOL_ARRAY: Parameter.Type.BOOL_ARRAY,
                    ParameterType.PARAMETER_INTEGER_ARRAY: Parameter.Type.INTEGER_ARRAY,
                    ParameterType.PARAMETER_DOUBLE_ARRAY: Parameter.Type.DOUBLE_ARRAY,
                    ParameterType.PARAMETER_STRING_ARRAY: Parameter.Type.STRING_ARRAY}


@dataclasses.dataclass(frozen=True)
class ParamField:
    """One leaf of a config dataclass as a ROS parameter."""

    name: str                 # dotted ROS parameter name, e.g. 'record.enabled'
    path: tuple[str, ...]     # field path in the nested dataclass
    ros_type: int             # rcl_interfaces ParameterType
    default: Any              # dataclass default (None: parameter left unset)
    help: str
    constraints: str


def _leaf_type(tp: Any) -> tuple[int, bool]:
    """(ROS parameter type, optional) of a field annotation; raises for unsupported ones."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        if len(args) != 1:
            raise cfg.ConfigError(f'unsupported parameter annotation {tp}')
        tp, origin = args[0], typing.get_origin(args[0])
    if origin is typing.Literal:
        values = typing.get_args(tp)
        return _SCALAR_TYPES[type(values[0])], optional
    if tp in _SCALAR_TYPES:
        return _SCALAR_TYPES[tp], optional
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if args and all(a == args[0] for a in args) and args[0] in _ARRAY_TYPES:
            return _ARRAY_TYPES[args[0]], optional
    raise cfg.ConfigError(f'unsupported parameter annotation {tp}')


def param_fields(cls: type, prefix: str = '', path: tuple[str, ...] = ()) -> list[ParamField]:
    """The leaves of config dataclass ``cls`` as ROS parameters (nested ones dotted)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(param_fields(tp, f'{prefix}{f.name}.', path + (f.name,)))
            continue
        ros_type, _ = _leaf_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(ParamField(prefix + f.name, path + (f.name,), ros_type, cfg.to_dict(default),
                              f.metadata.get('help', ''), cfg.constraints_text(f.metadata)))
    return out


def _nested(values: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in values.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _from_ros(value: Any) -> Any:
    """Plain Python value of a parameter (arrays as lists)."""
    if hasattr(value, 'tolist'):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


class ConfigParameters:
    """Declares the parameters of config dataclass ``cls`` on ``node`` and builds the config.

    ``runtime`` names the parameters that may change while the node runs; every other one is
    read-only. A change is accepted only if the whole config still builds; then
    ``on_change(new_config)`` is called. Raises :class:`cmkd_ros.config.ConfigError` at
    construction when the initial values are invalid. ``on_change`` may refuse a change by
    raising ValueError; it runs before the new config is stored.
    """

    def __init__(self, node: Node, cls: type, runtime: Iterable[str] = (),
                 on_change: Callable[[Any], None] | None = None):
        self.node = node
        self.cls = cls
        self.fields = param_fields(cls)
        self.runtime = set(runtime)
        unknown = self.runtime - {f.name for f in self.fields}
        if unknown:
            raise cfg.ConfigError(f'runtime parameter(s) {sorted(unknown)} are not fields of '
                                  f'{cls.__name__}')
        self.on_change = on_change
        self._values: dict[tuple[str, ...], Any] = {}
        for f in self.fields:
            self._values[f.path] = self._declare(f)
        self.config = self._build(self._values)
        node.add_on_set_parameters_callback(self._on_set)

    def _declare(self, f: ParamField) -> Any:
        dynamic = f.ros_type == ParameterType.PARAMETER_DOUBLE   # accept 1 for 1.0
        descriptor = ParameterDescriptor(
            name=f.name, type=ParameterType.PARAMETER_NOT_SET if dynamic else f.ros_type,
            description=f.help, additional_constraints=f.constraints,
            read_only=f.name not in self.runtime, dynamic_typing=dynamic)
        empty_array = isinstance(f.default, list) and not f.default
        if f.default is None or empty_array:
            # rclpy infers a byte array from [] and cannot hold None: declare by type only.
            param = self.node.declare_parameter(f.name, _PARAM_TYPE_ENUM[f.ros_type],
                                                descriptor)
            try:
                value = param.value
            except Exception:  # ParameterUninitializedException: keep the dataclass default
                return f.default
            return f.default if value is None else _from_ros(value)
        param = self.node.declare_parameter(f.name, f.default, descriptor)
        return _from_ros(param.value)

    def resolve(self, name: str, value: Any) -> None:
        """Give parameter ``name``, left at its empty default, the value derived at start-up
        (e.g. from a calibration file) and rebuild the config; later changes keep it."""
        path = tuple(name.split('.'))
        values = {**self._values, path: value}
        self.config = self._build(values)
        self._values = values

    def _build(self, values: dict[tuple[str, ...], Any]) -> Any:
        return cfg.build(self.cls, _nested(values))

    def _on_set(self, params: list[Parameter]) -> SetParametersResult:
        by_name = {f.name: f for f in self.fields}
        values = dict(self._values)
        for p in params:
            f = by_name.get(p.name)
            if f is None:
                continue                   # e.g. use_sim_time, QoS overrides
            if p.name not in self.runtime:
                return SetParametersResult(successful=False,
                                           reason=f'{p.name} is read-only at runtime')
            values[f.path] = _from_ros(p.value)
        try:
            new = self._build(values)
            if self.on_change is not None:
                self.on_change(new)        # may refuse with a ValueError (e.g. unknown class)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self._values = values
        self.config = new
        return SetParametersResult(successful=True)


# ----------------------------------------------------------------------------- diagnostics

class Diagnostics:
    """Counters, throttled warnings and a periodic ``/diagnostics`` status for one node.

    ``warn(key, text)`` logs at most once per ``throttle_s`` per key and turns the status to
    WARN for ``warn_hold_s``; ``fail(key, text)`` does the same at ERROR level and keeps the
    status ERROR until ``recover(key)``; ``count(key)`` increments a counter; ``set(key,
    value)`` sets a value shown in the status; ``info(text)`` logs. ``add_source(fn)`` adds
    statuses of their own to each publication: ``fn()`` returns ``(name, level, message,
    values)`` tuples, published as ``'<node>: <name>'``. Without diagnostic_msgs the statuses
    are logged instead. It is the :class:`cmkd_ros.pipelines.intake.Report` the node's
    pipeline reports to.
    """

    OK, WARN, ERROR, STALE = 0, 1, 2, 3

    def __init__(self, node: Node, name: str, period_s: float = 1.0, throttle_s: float = 5.0,
                 warn_hold_s: float = 5.0):
        self.node = node
        self.name = name
        self.throttle_s = throttle_s
        self.warn_hold_s = warn_hold_s
        self.counters: dict[str, int] = {}
        self.values: dict[str, Any] = {}
        self._last_log: dict[str, float] = {}
        self._last_warn: tuple[float, str] | None = None
        self.faults: dict[str, str] = {}
        self._last_text, self._last_text_time = '', -float('inf')
        self._lock = threading.Lock()
        self._sources: list[Callable[[], Iterable[tuple[str, int, str, dict]]]] = []
        try:
            from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
        except ImportError:
            self._msgs = None
            self._pub = None
            node.get_logger().warn('diagnostic_msgs is not importable: counters are logged '
                                   'instead of published on /diagnostics')
        else:
            self._msgs = (DiagnosticArray, DiagnosticStatus, KeyValue)
            self._pub = node.create_publisher(DiagnosticArray, '/diagnostics', reliable_qos())
        self._timer = node.create_timer(period_s, self.publish)

    def add_source(self, fn: Callable[[], Iterable[tuple[str, int, str, dict]]]) -> None:
        """Publish the statuses ``fn()`` gives (``(name, level, message, values)``) too."""
        self._sources.append(fn)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            self.values[key] = value

    def warn(self, key: str, text: str) -> None:
        """Count ``key``, log ``text`` (throttled per key) and raise the status to WARN."""
        message = self._report(key, text)
        if message:      # each severity logs from its own line: Jazzy's rclpy refuses one
            self.node.get_logger().warn(message)    # call site logging at two severities

    def fail(self, key: str, text: str) -> None:
        """Count ``key``, log ``text`` as an error (throttled per key) and hold the status at
        ERROR with ``text`` until :meth:`recover`."""
        with self._lock:
            self.faults[key] = text
        message = self._report(key, text)
        if message:
            self.node.get_logger().error(message)

    def info(self, text: str) -> None:
        """Log ``text`` once (not throttled: for one-off facts such as a scan pattern read)."""
        self.node.get_logger().info(text)

    def recover(self, key: str) -> bool:
        """End the fault ``key``; True when it was active."""
        with self._lock:
            return self.faults.pop(key, None) is not None

    def _report(self, key: str, text: str) -> str | None:
        """Count ``key``; the log line for ``text``, or None while throttled."""
        now = time.monotonic()
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + 1
            self._last_warn = (now, f'{key}: {text}')
            last = self._last_log.get(key)
            log = last is None or now - last >= self.throttle_s
            if log:
                self._last_log[key] = now
            count = self.counters[key]
        return f'{text} [{key}, {count} so far]' if log else None

    def status(self) -> tuple[int, str, dict[str, str]]:
        """(level, message, key/values) of the current state."""
        with self._lock:
            items = {k: str(v) for k, v in sorted(self.counters.items())}
            items.update({k: str(v) for k, v in sorted(self.values.items())})
            last = self._last_warn
            faults = '; '.join(f'{k}: {v}' for k, v in sorted(self.faults.items()))
        if faults:
            return self.ERROR, faults, items
        if last is not None and time.monotonic() - last[0] < self.warn_hold_s:
            return self.WARN, last[1], items
        return self.OK, 'ok', items

    def publish(self) -> None:
        statuses = [(self.name, *self.status())]
        for source in self._sources:
            statuses.extend(source())
        if self._msgs is None:
            # Logged instead: when something changed, at most once per throttle_s.
            text = ' | '.join(f'{name}: {message}; ' + ', '.join(f'{k}={v}'
                                                               for k, v in items.items())
                              for name, _, message, items in statuses)
            now = time.monotonic()
            if text != self._last_text and now - self._last_text_time >= self.throttle_s:
                self._last_text, self._last_text_time = text, now
                self.node.get_logger().info(text)
            return
        DiagnosticArray, DiagnosticStatus, KeyValue = self._msgs
        msg = DiagnosticArray(status=[DiagnosticStatus(
            level=bytes([level]), name=f'{self.node.get_name()}: {name}', message=message,
            hardware_id=self.node.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=str(v)) for k, v in items.items()])
            for name, level, message, items in statuses])
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self._pub.publish(msg)


class LiveTransforms:
    """The live ``/tf_static`` and ``/tf`` through a tf2_ros buffer (full ROS 2 installs).

    tf2_ros and tf2_msgs are not on PyPI: without them the constructor raises ImportError
    naming what is missing. Lookups take the latest transforms.
    """

    def __init__(self, node: Node):
        try:
            import tf2_msgs.msg  # noqa: F401  (the listener's message type)
            import tf2_ros
        except ImportError as exc:
            raise ImportError(f'the live TF needs tf2_ros and tf2_msgs, ROS 2 packages that '
                              f'PyPI does not have ({exc})') from None
        self._errors = tf2_ros.TransformException
        self.buffer = tf2_ros.Buffer()
        self.listener = tf2_ros.TransformListener(self.buffer, node)
        self.last_error = ''

    def lookup(self, target: str, source: str) -> Any:
        """(4, 4) ``T_target_source`` known now, or None (``last_error`` says why)."""
        from rclpy.time import Time

        from cmkd_ros.tf_tree import message_matrix
        try:
            msg = self.buffer.lookup_transform(target, source, Time())
        except self._errors as exc:
            self.last_error = str(exc)
            return None
        return message_matrix(msg.transform)


def spin_until_shutdown(node: Node, executor: Any = None) -> None:
    """Spin ``node`` until Ctrl-C / SIGTERM or context shutdown, then destroy it cleanly.

    Further SIGINTs are ignored while the node closes (its waits are bounded): a Ctrl-C in a
    terminal reaches the node twice, from the terminal and forwarded by ``ros2 launch``, and the
    second one would otherwise break the clean-up with a traceback.
    """
    import signal
    import threading

    import rclpy
    from rclpy.executors import ExternalShutdownException
    try:
        if executor is None:
            rclpy.spin(node)
        else:
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        close = getattr(node, 'close', None)
        if callable(close):
            close()
        node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()


# ----------------------------------------------------------------------------- Fast DDS profile

def package_config_path(name: str) -> str:
    """Path of config/``name``: the installed share folder, else the source tree."""
    import os
    try:
        from ament_index_python.packages import get_package_share_directory
        path = os.path.join(get_package_share_directory('cmkd_ros'), 'config', name)
        if os.path.isfile(path):
            return path
    except (ImportError, LookupError, ValueError):
        pass
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), 'config', name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config/{name} not found (looked for {path})')
    return path


def fastdds_profile_path() -> str:
    """Path of config/fastdds_shm.xml (installed, else the source tree's)."""
    return package_config_path('fastdds_shm.xml')


def ensure_fastdds_profile(env: dict | None = None) -> dict:
    """Point Fast DDS at the 64 MB shared-memory profile unless a profile is already set.

    Works on ``env`` (default ``os.environ``); call before ``rclpy.init``: Fast DDS reads the
    variable when the first participant is created. Other RMW implementations are left alone.
    """
    import os
    env = os.environ if env is None else env
    rmw = env.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    if not rmw.startswith('rmw_fastrtps'):
        return env
    path = next((env[v] for v in PROFILE_VARIABLES if env.get(v)), None) or fastdds_profile_path()
    for var in profile_variables(env):
        if not env.get(var):
            env[var] = path
    return env


def exit_if_help_requested(argv: list[str], node_name: str, config_cls: type,
                           summary: str) -> None:
    """Print usage and the node's parameters (from its config schema) for ``-h``/``--help``.

    Only arguments before ``--ros-args`` are looked at, so ROS arguments are never mistaken for it.
    """
    own = argv[1:argv.index('--ros-args')] if '--ros-args' in argv else argv[1:]
    if not {'-h', '--help'} & set(own):
        return
    print(f'usage: ros2 run cmkd_ros {node_name} [--ros-args --params-file FILE '
          f'-p NAME:=VALUE -r FROM:=TO ...]\n\n{summary}\n\nparameters:')
    for name, tp, default, text in cfg.describe(config_cls):
        print(f'  {name} ({tp}, default {default!r}): {text}')
    raise SystemExit(0)


def run_node(node_cls: type, node_name: str, config_cls: type, summary: str,
             startup_errors: tuple[type[BaseException], ...], args: list[str] | None = None,
             ) -> None:
    """Console-script body shared by the nodes: ``--help``, init, build, spin, clean shutdown.

    An error of ``startup_errors`` while the node is built (a bad parameter, calibration or
    checkpoint) is logged as fatal and exits with status 2 instead of a traceback.
    """
    import sys

    import rclpy

    from cmkd_ros.openmp import openmp_defaults
    openmp_defaults()  # before torch loads OpenMP: how its idle workers wait
    exit_if_help_requested(sys.argv if args is None else list(args), node_name, config_cls,
                           summary)
    rclpy.init(args=args)
    try:
        node = node_cls()
    except startup_errors as exc:
        rclpy.logging.get_logger(node_name).fatal(str(exc))
        rclpy.try_shutdown()
        raise SystemExit(2)
    spin_until_shutdown(node)
