#!/usr/bin/env bash
# Register cmkd_ros in the ament index of a prefix (a venv) whose package was installed editable:
# share/cmkd_ros/{launch,config,package.xml} link to the source tree, lib/cmkd_ros/<node> to the
# venv's console scripts, so get_package_share_directory() and `ros2 run` find them.
set -euo pipefail
PREFIX="$1"; SRC="$2"
mkdir -p "$PREFIX/share/ament_index/resource_index/packages" "$PREFIX/share/cmkd_ros" \
         "$PREFIX/lib/cmkd_ros"
: > "$PREFIX/share/ament_index/resource_index/packages/cmkd_ros"
for item in launch config package.xml; do
  ln -sfn "$SRC/$item" "$PREFIX/share/cmkd_ros/$item"
done
for exe in collect_node segment_node; do
  if [ -x "$PREFIX/bin/$exe" ]; then ln -sfn "$PREFIX/bin/$exe" "$PREFIX/lib/cmkd_ros/$exe"; fi
done
