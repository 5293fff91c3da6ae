# Source this file to use cmkd_ros from its venv with the PyPI ROS 2 wheels:
#   source scripts/env.sh            (CMKD_VENV selects another venv)
# With a full ROS 2 install, source /opt/ros/<distro>/setup.bash and your colcon workspace instead.
_cmkd_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
_cmkd_venv="${CMKD_VENV:-$_cmkd_root/.venv}"
if [ -f "$_cmkd_venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$_cmkd_venv/bin/activate"
fi
case ":${AMENT_PREFIX_PATH:-}:" in
  *":$_cmkd_venv:"*) ;;
  *) export AMENT_PREFIX_PATH="$_cmkd_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;;
esac
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Large clouds and images over best-effort QoS need a bigger Fast DDS shared-memory segment.
# Fast DDS 2.x (Humble, Iron, Jazzy) reads only FASTRTPS_DEFAULT_PROFILES_FILE, Fast DDS 3
# (Kilted) only FASTDDS_DEFAULT_PROFILES_FILE: the name is chosen from the library installed.
_cmkd_var=$(PYTHONPATH="$_cmkd_root${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
  'from cmkd_ros.nodes.launch_support import profile_variables; print(profile_variables()[0])' \
  2>/dev/null || echo FASTDDS_DEFAULT_PROFILES_FILE)
eval "_cmkd_set=\${$_cmkd_var:-}"
if [ -z "$_cmkd_set" ]; then
  export "$_cmkd_var=${FASTDDS_DEFAULT_PROFILES_FILE:-${FASTRTPS_DEFAULT_PROFILES_FILE:-$_cmkd_root/config/fastdds_shm.xml}}"
fi
unset _cmkd_var _cmkd_set
# `ros2 run cmkd_ros <node>` looks in <prefix>/lib/cmkd_ros; pip puts console scripts in bin/.
for _cmkd_exe in collect_node segment_node; do
  if [ -x "$_cmkd_venv/bin/$_cmkd_exe" ] && [ ! -e "$_cmkd_venv/lib/cmkd_ros/$_cmkd_exe" ]; then
    mkdir -p "$_cmkd_venv/lib/cmkd_ros" && ln -sfn "$_cmkd_venv/bin/$_cmkd_exe" "$_cmkd_venv/lib/cmkd_ros/$_cmkd_exe"
  fi
done
unset _cmkd_exe
# The nodes' OpenMP settings (cmkd_ros/openmp.py): idle workers spin about 0.1 ms, then sleep.
if [ -z "${OMP_WAIT_POLICY+set}" ]; then
  export OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-10000}"
fi
export CMKD_DATA_DIR="${CMKD_DATA_DIR:-$_cmkd_root/../shared/data}"
unset _cmkd_root _cmkd_venv
