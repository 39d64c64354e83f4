#!/usr/bin/env bash
# Install, upgrade or remove the midgate agent on a Raspberry Pi (Raspberry Pi OS / Debian bookworm, Python 3.11)
# or any Debian box. Run as root. Every step checks before it acts, so running it twice changes nothing.
#
#   install.sh [--hub [hub options]] [--source DIR | --wheel FILE] [--wheelhouse DIR]
#                                                                          first install (a re-run changes nothing)
#   install.sh --upgrade [--source DIR | --wheel FILE] [--wheelhouse DIR]  new version; keys, config, outbox and
#                                                                          sample store kept; rolled back when the
#                                                                          new version fails its health check
#   install.sh --uninstall [--purge-data]                                  remove what this script installed; the
#                                                                          member's data only with --purge-data
#
# --source DIR: a checkout of midgate (default: the one this script is in); --wheel FILE: a built midgate wheel.
# --wheelhouse DIR: install every Python package from DIR only (no index), e.g. on a device without internet.
# --hub: a Mosquitto on the Pi for the home's small sensors (ESP32 and the like), read by the agent. Hub options:
#   --hub-sensor NAME   a login for one sensor (publishes on sensors/NAME/...) and its [[sensors]] table in
#                       agent.toml; repeat for more; a re-run with a new name adds it, keeping the others
#   --hub-lan           listen on the home network (default: on this Pi only, e.g. for Zigbee2MQTT on it); a
#                       re-run keeps it open, --hub-loopback closes it again
#   --hub-device ID     a login for another midgate device at home (its device id), whose messages the bridge
#                       carries to the MID: that device's agent.toml names the hub in a [[via_hub]] table
#   --bridge HOST:PORT --bridge-login USER --bridge-password-file FILE --bridge-ca FILE
#                       bridge the mid/ topics to the MID's broker over TLS with the hub's relay login from the MID
#                       (`midgate coordinator relay add`)
set -euo pipefail

PREFIX=/opt/midgate
VENV=$PREFIX/venv
CONF_DIR=/etc/midgate
CONF=$CONF_DIR/agent.toml
DATA=/var/lib/midgate
UNIT=/etc/systemd/system/midgate-agent.service
DROPIN_DIR=/etc/systemd/system/midgate-agent.service.d
# Hub mode's bridge, kept out of /etc/mosquitto/conf.d until the member has filled it in: Mosquitto refuses to start
# with its placeholders (no password file, no CA), and the member may run a Mosquitto of their own.
HUB_CONF=$CONF_DIR/mosquitto-hub-bridge.conf
# The hub's listener, logins and topic rules (hub-mosquitto.sh); Mosquitto reads them as user mosquitto.
HUB_MOSQUITTO_DIR=/etc/mosquitto/midgate-hub
# The agent's password on the hub's broker (group midgate) and each small sensor's (root only).
HUB_SECRETS=$CONF_DIR/hub
USER_NAME=midgate
# One torch for both architectures: the CPU build, from PyTorch's CPU index, pinned with its local label. PyPI's
# torch 2.13.0 is a CUDA build on aarch64 as on x86_64 (its aarch64 wheel requires cuda-toolkit and nvidia-cudnn-cu13,
# several GB a Pi can neither hold nor use), so an unlabelled pin could resolve to it; `+cpu` cannot.
TORCH_VERSION=2.13.0+cpu
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
HEALTH_TIMEOUT_S=${MIDGATE_HEALTH_TIMEOUT_S:-120}

here=$(cd "$(dirname "$0")" && pwd)
mode=install
hub=0
hub_lan=""
hub_sensors=()
hub_devices=()
bridge=""
bridge_login=""
bridge_password_file=""
bridge_ca=""
purge=0
source_dir=""
wheel=""
wheelhouse=""

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "midgate: $*"; }

while [ $# -gt 0 ]; do
  case $1 in
    --upgrade) mode=upgrade ;;
    --uninstall) mode=uninstall ;;
    --purge-data) purge=1 ;;
    --hub) hub=1 ;;
    --hub-lan) hub_lan=1 ;;
    --hub-loopback) hub_lan=0 ;;
    --hub-sensor) hub_sensors+=("${2:?--hub-sensor needs a name}"); shift ;;
    --hub-device) hub_devices+=("${2:?--hub-device needs a device id}"); shift ;;
    --bridge) bridge=${2:?--bridge needs HOST:PORT}; shift ;;
    --bridge-login) bridge_login=${2:?--bridge-login needs a user}; shift ;;
    --bridge-password-file) bridge_password_file=${2:?--bridge-password-file needs a file}; shift ;;
    --bridge-ca) bridge_ca=${2:?--bridge-ca needs a file}; shift ;;
    --source) source_dir=${2:?--source needs a folder}; shift ;;
    --wheel) wheel=${2:?--wheel needs a file}; shift ;;
    --wheelhouse) wheelhouse=${2:?--wheelhouse needs a folder}; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
[ "$purge" = 0 ] || [ "$mode" = uninstall ] || die "--purge-data goes with --uninstall"
if [ "$hub" = 0 ] && { [ -n "$hub_lan" ] || [ ${#hub_sensors[@]} -gt 0 ] || [ ${#hub_devices[@]} -gt 0 ] ||
  [ -n "$bridge" ]; }; then
  die "--hub-lan, --hub-loopback, --hub-sensor, --hub-device and --bridge go with --hub"
fi

systemd_running() { [ -d /run/systemd/system ]; }

ensure_packages() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_user() {
  id "$USER_NAME" >/dev/null 2>&1 ||
    useradd --system --user-group --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
  if getent group i2c >/dev/null; then usermod -aG i2c "$USER_NAME"; fi
  install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$DATA"
  install -d -m 0750 -g "$USER_NAME" "$CONF_DIR"
}

pip_args() {
  if [ -n "$wheelhouse" ]; then printf '%s\n' --no-index --find-links "$wheelhouse"; return; fi
  printf '%s\n' --extra-index-url "$TORCH_CPU_INDEX"
}

# Install midgate and its dependencies into $VENV. torch is pinned in the same resolve: an unpinned torch makes
# pip pick the CUDA build. The midgate wheel itself is always reinstalled, so an upgrade to a build of the
# same version still replaces the code.
install_midgate() {
  local args target
  mapfile -t args < <(pip_args)
  target=${wheel:-${source_dir:-$(cd "$here/../.." && pwd)}}
  [ -e "$target" ] || die "no such wheel or source folder: $target"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check "${args[@]}" "torch==$TORCH_VERSION" "$target"
  "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check --no-deps --force-reinstall "${args[@]}" "$target"
  # The installed copy of these files (unit, templates, health check, this script for --upgrade and --uninstall)
  # comes with the version: from --source's checkout, else from beside this script (unless this is that copy).
  local from=$here
  if [ -n "$source_dir" ]; then from=$source_dir/deploy/raspberrypi; fi
  if [ "$from" != "$PREFIX/deploy" ]; then
    # `install` replaces each file by a new one: a running copy of this script is never overwritten in place.
    install -d -m 0755 "$PREFIX/deploy"
    install -m 0644 "$from"/health_check.py "$from"/*.template "$from"/*.conf "$from"/*.service "$from"/README.md \
      "$PREFIX/deploy/"
    install -m 0755 "$from/install.sh" "$from/hub-mosquitto.sh" "$PREFIX/deploy/"
  fi
}

# The BME280 answers 0x60 from its chip-id register (0xD0) at 0x76 or 0x77. Prints "bus address" when found.
detect_bme280() {
  local dev bus
  for dev in /dev/i2c-*; do
    [ -e "$dev" ] || continue
    bus=${dev#/dev/i2c-}
    "$VENV/bin/python" - "$bus" <<'EOF' && return 0
import sys
from smbus2 import SMBus
bus = int(sys.argv[1])
try:
    with SMBus(bus) as smbus:
        for address in (0x76, 0x77):
            try:
                if smbus.read_byte_data(address, 0xD0) == 0x60:
                    print(bus, hex(address))
                    sys.exit(0)
            except OSError:
                pass
except OSError:
    pass
sys.exit(1)
EOF
  done
  return 1
}

# /etc/midgate/agent.toml from agent.toml.template, once: a member's later edits are theirs and never overwritten.
write_config() {
  local found bus="" address=""
  if [ -f "$CONF" ]; then say "keeping $CONF"; return; fi
  if found=$(detect_bme280); then read -r bus address <<<"$found"; say "BME280 found on I2C bus $bus at $address"; fi
  {
    cat "$PREFIX/deploy/agent.toml.template"
    if [ -n "$bus" ]; then
      printf '\n[[sensors]]\ndriver = "bme280"\nname = "bme280"\nbus_number = %s\naddress = %s\nperiod_ms = 10000\n' \
        "$bus" "$address"
    fi
  } >"$CONF.new"
  chgrp "$USER_NAME" "$CONF.new"
  chmod 0640 "$CONF.new"
  mv "$CONF.new" "$CONF"
}

# The unit, and a drop-in giving the agent the I2C buses its config names (and no other device).
write_units() {
  local buses bus
  install -m 0644 "$PREFIX/deploy/midgate-agent.service" "$UNIT"
  buses=$(sed -n 's/^bus_number *= *\([0-9]*\).*/\1/p' "$CONF" | sort -u)
  if [ -n "$buses" ]; then
    install -d -m 0755 "$DROPIN_DIR"
    {
      cat "$PREFIX/deploy/i2c.conf.template"
      for bus in $buses; do echo "DeviceAllow=/dev/i2c-$bus rw"; done
    } >"$DROPIN_DIR/i2c.conf"
  else
    rm -rf "$DROPIN_DIR"
  fi
  systemctl daemon-reload 2>/dev/null || true
  systemctl enable midgate-agent.service 2>/dev/null
}

# The hub's Mosquitto: listener and logins (hub-mosquitto.sh), the bridge when its settings are given, and an
# [[sensors]] table in agent.toml for each sensor login not yet there (the member's own edits are kept).
write_hub() {
  ensure_packages mosquitto
  local args=(--conf-dir "$HUB_MOSQUITTO_DIR" --secret-dir "$HUB_SECRETS") name new=() new_devices=() address
  case $hub_lan in 1) args+=(--lan) ;; 0) args+=(--loopback) ;; esac
  for name in "${hub_sensors[@]}"; do
    [ -f "$HUB_SECRETS/$name.secret" ] || new+=("$name")
    args+=(--sensor "$name")
  done
  for name in "${hub_devices[@]}"; do
    [ -f "$HUB_SECRETS/$name.secret" ] || new_devices+=("$name")
    args+=(--device "$name")
  done
  if [ -n "$bridge" ]; then
    args+=(--bridge "$bridge" --bridge-login "$bridge_login" --bridge-password-file "$bridge_password_file")
    args+=(--bridge-ca "$bridge_ca")
  fi
  bash "$PREFIX/deploy/hub-mosquitto.sh" "${args[@]}"
  chgrp -R mosquitto "$HUB_MOSQUITTO_DIR"
  chmod 0750 "$HUB_MOSQUITTO_DIR"
  chgrp "$USER_NAME" "$HUB_SECRETS" "$HUB_SECRETS/agent.secret"
  chmod 0750 "$HUB_SECRETS"
  chmod 0640 "$HUB_SECRETS/agent.secret"
  install -m 0644 "$HUB_MOSQUITTO_DIR/midgate-hub.conf" /etc/mosquitto/conf.d/midgate-hub.conf
  if [ -n "$bridge" ]; then
    install -m 0640 -g mosquitto "$HUB_MOSQUITTO_DIR/midgate-bridge.conf" /etc/mosquitto/conf.d/midgate-bridge.conf
    rm -f "$HUB_CONF"
  else
    offer_bridge
  fi
  for name in "${hub_sensors[@]}"; do
    grep -q "^topic = \"sensors/$name/" "$CONF" ||
      sed "s/@NAME@/$name/g" "$PREFIX/deploy/hub-sensor.toml.template" >>"$CONF"
  done
  if systemd_running; then systemctl restart mosquitto; fi
  for name in "${new[@]}"; do
    say "hub sensor $name: login $name, password $(cat "$HUB_SECRETS/$name.secret"), topic sensors/$name/state"
  done
  address=$(hostname -I 2>/dev/null | cut -d' ' -f1)
  for name in "${new_devices[@]}"; do
    say "hub device $name: login $name, password $(cat "$HUB_SECRETS/$name.secret"); in its agent.toml:" \
      "[[via_hub]] mid = \"MID\", host = \"${address:-THIS-PI}\", password_file = \"FILE WITH THAT PASSWORD\""
  done
  if grep -q '^listener 1883 0\.0\.0\.0$' "$HUB_MOSQUITTO_DIR/midgate-hub.conf"; then
    say "hub: small sensors and devices at home reach Mosquitto at ${address:-this Pi}:1883"
  elif [ ${#hub_devices[@]} -gt 0 ]; then
    say "hub: Mosquitto listens on this Pi only; rerun with --hub-lan for devices at home to reach it"
  fi
}

# Without --bridge, the bridge template waits in $HUB_CONF for the member to fill in (unless a bridge is installed).
offer_bridge() {
  if [ ! -f "$HUB_CONF" ] && [ ! -f /etc/mosquitto/conf.d/midgate-bridge.conf ]; then
    install -m 0640 "$PREFIX/deploy/mosquitto-hub-bridge.conf" "$HUB_CONF"
    say "hub: to bridge to the MID's broker, rerun with --bridge (or fill in $HUB_CONF and copy it to" \
      "/etc/mosquitto/conf.d/midgate-bridge.conf)"
  fi
}

# Run the installed agent as the service would (same user, same config) until it says READY=1 over a notify
# socket, or, before enrolment, until it has loaded its config and every module the agent imports.
health_check() {
  setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups --reset-env -- "$VENV/bin/python" "$PREFIX/deploy/health_check.py" "$CONF" "$HEALTH_TIMEOUT_S"
}

service() { if systemd_running; then systemctl "$@" midgate-agent.service; fi; }

enrol_hint() {
  cat <<EOF

midgate agent installed. To join your MID (the invite comes from its operator):
  sudo -u $USER_NAME $VENV/bin/midgate agent enrol --config $CONF --mid https://MID-ADDRESS --invite TOKEN
  sudo systemctl start midgate-agent
Your statement: sudo -u $USER_NAME $VENV/bin/midgate agent statement --config $CONF
Guide: $PREFIX/deploy/README.md (or deploy/raspberrypi/README.md in the source)
EOF
}

do_install() {
  ensure_packages python3 python3-venv
  ensure_user
  # Installed already: this run only checks the rest (a new version is --upgrade's, with its health check and
  # roll-back).
  if [ -x "$VENV/bin/midgate" ] && [ -f "$PREFIX/deploy/install.sh" ]; then
    say "keeping the installed midgate (a new version: --upgrade)"
  else
    install_midgate
  fi
  write_config
  write_units
  [ "$hub" = 0 ] || write_hub
  health_check || die "the installed agent failed its health check (see above)"
  enrol_hint
}

# The version before an upgrade: its venv and its deploy files (unit, health check), kept until the new one passed.
keep_previous() {
  cp -a "$VENV" "$VENV.previous"
  cp -a "$PREFIX/deploy" "$PREFIX/deploy.previous"
}

restore_previous() {
  rm -rf "$VENV" "$PREFIX/deploy"
  mv "$VENV.previous" "$VENV"
  mv "$PREFIX/deploy.previous" "$PREFIX/deploy"
}

drop_previous() { rm -rf "$VENV.previous" "$PREFIX/deploy.previous"; }

do_upgrade() {
  [ -x "$VENV/bin/midgate" ] || die "nothing to upgrade under $VENV: install first"
  # An upgrade interrupted before its check leaves the previous venv beside the new one: it is the one known good.
  if [ -d "$VENV.previous" ]; then say "an earlier upgrade did not finish: restoring the version before it"; restore_previous; fi
  local before
  before=$("$VENV/bin/pip" show midgate 2>/dev/null | sed -n 's/^Version: //p')
  service stop
  keep_previous
  if install_midgate && write_units && health_check; then
    drop_previous
    service start
    say "upgraded from $before to $("$VENV/bin/pip" show midgate | sed -n 's/^Version: //p'); keys, config, outbox and samples kept"
  else
    say "the new version failed its health check: rolling back to $before"
    restore_previous
    write_units
    service start
    die "upgrade rolled back; the agent runs $before"
  fi
}

do_uninstall() {
  if systemd_running; then systemctl disable --now midgate-agent.service 2>/dev/null || true; else
    systemctl disable midgate-agent.service 2>/dev/null || true
  fi
  rm -rf "$UNIT" "$DROPIN_DIR" "$PREFIX" "$CONF_DIR" "$HUB_CONF" "$HUB_MOSQUITTO_DIR" \
    /etc/mosquitto/conf.d/midgate-hub.conf /etc/mosquitto/conf.d/midgate-bridge.conf
  if systemd_running; then systemctl try-restart mosquitto 2>/dev/null || true; fi
  systemctl daemon-reload 2>/dev/null || true
  if [ "$purge" = 1 ]; then
    rm -rf "$DATA"
    if id "$USER_NAME" >/dev/null 2>&1; then userdel "$USER_NAME"; fi
    say "removed midgate and the member's data (keys, outbox, sample store)"
  else
    say "removed midgate; the member's data is kept in $DATA (remove it with --uninstall --purge-data)"
  fi
}

case $mode in
  install) do_install ;;
  upgrade) do_upgrade ;;
  uninstall) do_uninstall ;;
esac
