#!/bin/sh
# Debian's headless Chromium for the gallery's browser test (tests/test_gallery.py), which fails, never
# skips, without it. Does nothing when chromium is already on PATH; else installs it (as root, or with sudo).
set -eu
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
