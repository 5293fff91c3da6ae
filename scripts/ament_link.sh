#!/usr/bin/env bash
# Register cmkd_ros in the ament index of a prefix (a venv) whose package was installed editable:
# share/cmkd_ros/{launch,config}/<file> and share/cmkd_ros/package.xml link to the source tree,
# lib/cmkd_ros/<node> to the venv's console scripts, so get_package_share_directory(),
# `ros2 launch cmkd_ros <file>` and `ros2 run` find them. The folders are real and only the files
# are links: ros2 launch looks for a file with os.walk, which does not enter linked folders.
# Idempotent and cheap: scripts/install.sh runs it every time, so new launch or config files show.
set -euo pipefail
PREFIX="$1"; SRC="$2"
SHARE="$PREFIX/share/cmkd_ros"
mkdir -p "$PREFIX/share/ament_index/resource_index/packages" "$SHARE" "$PREFIX/lib/cmkd_ros"
: > "$PREFIX/share/ament_index/resource_index/packages/cmkd_ros"
ln -sfn "$SRC/package.xml" "$SHARE/package.xml"
for folder in launch config; do
  # an older version of this script linked the whole folder
  if [ -L "$SHARE/$folder" ]; then rm "$SHARE/$folder"; fi
  mkdir -p "$SHARE/$folder"
  find "$SHARE/$folder" -maxdepth 1 -type l ! -exec test -e {} \; -delete  # removed sources
  for file in "$SRC/$folder"/*; do
    case "$file" in *.py|*.yaml|*.xml) ln -sfn "$file" "$SHARE/$folder/$(basename "$file")" ;; esac
  done
done
for exe in collect_node segment_node; do
  if [ -x "$PREFIX/bin/$exe" ]; then ln -sfn "$PREFIX/bin/$exe" "$PREFIX/lib/cmkd_ros/$exe"; fi
done
