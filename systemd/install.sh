#!/usr/bin/env bash
# Install gemma-agent as a systemd service from this checkout. Run as root; running it again upgrades in place.
#
#   sudo systemd/install.sh [--prefix DIR] [--no-enable] [--no-venv] [--dry-run] [--root DIR] [--dev DIR]
#
#   --prefix DIR  where the virtual environment goes (default /opt/gemma-agent; the unit's ExecStart follows).
#                 Not under /home: the unit has ProtectHome=yes.
#   --no-enable   do not `systemctl enable` the service
#   --no-venv     leave the virtual environment alone: only user, directories, config and unit
#   --dry-run     print each step instead of doing it
#   --root DIR    install the files under DIR as if it were / (packaging, tests). No user or group is created,
#                 nothing is chown'ed and systemctl is not run, so root is not needed; combine with --no-venv
#                 unless DIR is the final location (a venv's scripts hold absolute paths).
#   --dev DIR     where to look for GPU device nodes (default /dev)
# Environment: PYTHON creates the venv (default python3); LLAMA_WHEEL is a llama-cpp-python wheel to use
# instead of building one with .ci/build-llama (e.g. a CUDA build for a Jetson).
#
# Never overwrites /etc/gemma-agent/agent.yaml: the shipped defaults go to agent.yaml.dist beside it.
set -euo pipefail

prefix=/opt/gemma-agent root='' dev=/dev enable=1 venv=1 dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --root) root=${2:?--root needs a directory}; shift ;;
    --dev) dev=${2:?--dev needs a directory}; shift ;;
    --no-enable) enable=0 ;;
    --no-venv) venv=0 ;;
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 64 ;;
  esac
  shift
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be an absolute path, got '$prefix'" >&2; exit 64 ;; esac
if [ -z "$root" ] && [ "$dry" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or see what it would do with --dry-run" >&2; exit 77
fi
src=$(cd "$(dirname "$0")/.." && pwd)
user=gemma-agent
etc=$root/etc/gemma-agent unitdir=$root/etc/systemd/system state=$root/var/lib/gemma-agent

run() {  # run a command, or show it under --dry-run
  if [ "$dry" = 1 ]; then echo "+ $*"; else "$@"; fi
}
put() {  # put FILE MODE CONTENT-FILE: write a file only when its content changes
  if [ -e "$1" ] && cmp -s "$3" "$1"; then echo "unchanged: $1"; else run install -m "$2" "$3" "$1"; fi
}
owner() { [ -n "$root" ] || run chown "$@"; }

# 1. The service user: a system account without a login shell, at home in the state directory.
if [ -z "$root" ]; then
  getent group "$user" >/dev/null || run groupadd --system "$user"
  if ! getent passwd "$user" >/dev/null; then
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    run useradd --system --gid "$user" --home-dir /var/lib/gemma-agent --no-create-home --shell "$nologin" "$user"
  fi
  for group in video audio render; do  # cameras, sound, GPU render nodes (render does not exist everywhere)
    if getent group "$group" >/dev/null && ! id -nG "$user" 2>/dev/null | grep -qw "$group"; then
      run usermod --append --groups "$group" "$user"
    fi
  done
fi

# 2. Directories. systemd creates StateDirectory= and CacheDirectory= itself; the models folder is made here
#    so there is somewhere to copy the GGUF files to before the first start.
run install -d -m 0755 "$etc" "$unitdir"
run install -d -m 0755 "$state" "$state/models"
owner "$user:$user" "$state" "$state/models"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 3. The virtual environment, with the llama-cpp-python wheel built for this CPU. pip builds a project in its
#    source folder, so it builds a copy: no root-owned build/ or *.egg-info is left in the checkout.
if [ "$venv" = 1 ]; then
  py=${PYTHON:-python3}
  [ -x "$root$prefix/venv/bin/python" ] || run "$py" -m venv "$root$prefix/venv"
  if [ "$dry" = 1 ]; then
    wheel=${LLAMA_WHEEL:-"<the wheel .ci/build-llama prints>"}
  else
    wheel=${LLAMA_WHEEL:-$(PYTHON="$py" "$src/.ci/build-llama")}
  fi
  mkdir "$tmp/src"
  tar -C "$src" --exclude='*.gguf*' --exclude=__pycache__ -cf - pyproject.toml README.md agent devices models \
    | tar -C "$tmp/src" -xf -
  run "$root$prefix/venv/bin/pip" install --disable-pip-version-check --quiet "$wheel" "$tmp/src"
fi

# 4. Configuration: the user's copy is never touched; agent.yaml.dist always holds the shipped defaults.
put "$etc/agent.yaml.dist" 0644 "$src/config/agent.yaml"
if [ ! -e "$etc/agent.yaml" ]; then
  run install -m 0640 "$src/config/agent.yaml" "$etc/agent.yaml"
  owner "root:$user" "$etc/agent.yaml"
else
  echo "kept: $etc/agent.yaml (compare with agent.yaml.dist after an upgrade)"
fi

# 5. The unit (ExecStart follows --prefix) and, on boards with NVIDIA GPU nodes, a drop-in allowing exactly the
#    nodes found now: DeviceAllow= takes no globs in /dev paths, and a listed path that is missing makes
#    systemd warn at every start. Re-run this script after a JetPack upgrade.
sed "s#^ExecStart=/opt/gemma-agent/#ExecStart=$prefix/#" "$src/systemd/gemma-agent.service" > "$tmp/unit"
put "$unitdir/gemma-agent.service" 0644 "$tmp/unit"
shopt -s nullglob
nodes=()
for node in "$dev"/nvmap "$dev"/nvhost-* "$dev"/nvgpu/*/* "$dev"/nvidia*; do
  if [ -c "$node" ]; then nodes+=("/dev/${node#"$dev"/}"); fi
done
dropin=$unitdir/gemma-agent.service.d/devices.conf
if [ ${#nodes[@]} -gt 0 ]; then
  { echo "# Written by systemd/install.sh: the GPU device nodes present when it ran."
    echo "[Service]"
    printf 'DeviceAllow=%s rw\n' "${nodes[@]}"; } > "$tmp/devices"
  run install -d -m 0755 "${dropin%/*}"
  put "$dropin" 0644 "$tmp/devices"
elif [ -e "$dropin" ]; then
  run rm -f "$dropin"
fi

# 6. systemd, when it is the running init (not in a container build or under --root).
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
  [ "$enable" = 0 ] || run systemctl enable gemma-agent.service
  running=$(systemctl is-active gemma-agent.service 2>/dev/null || true)
else
  running=
  echo "systemd is not running here (or --root): skipped daemon-reload and enable"
fi

cat <<EOF

gemma-agent is installed. Next steps:
  1. Copy a model into /var/lib/gemma-agent/models/ (readable by $user) and set model.path in
     /etc/gemma-agent/agent.yaml, e.g. models/gemma-3n-E2B-it-Q4_K_M.gguf, plus mqtt.host.
  2. MQTT password: GEMMA_AGENT_MQTT_PASSWORD=... in /etc/gemma-agent/env (chmod 600).
  3. Check it where the service runs (relative paths resolve in /var/lib/gemma-agent):
     cd /var/lib/gemma-agent && sudo -u $user $prefix/venv/bin/gemma-agent check --config /etc/gemma-agent/agent.yaml
  4. Start it: systemctl start gemma-agent; follow it: journalctl -u gemma-agent -f
EOF
if [ "$dry" = 1 ]; then echo "(dry run: nothing was changed)"; fi
if [ "$running" = active ]; then echo "  The service is running the old version: systemctl restart gemma-agent"; fi
