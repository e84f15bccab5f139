# Sourced by the scripts that need root (namespaces, TUN/TAP devices, apt-get): as root, nothing
# happens; otherwise the calling script runs itself again through sudo when sudo exists, or stops
# with a message saying to run it as root.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -- "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "$@"
  fi
  echo "$(basename "$0"): needs root (network namespaces, TUN/TAP devices, Debian packages) and sudo is not installed: run it as root" >&2
  exit 1
fi
