#!/usr/bin/env bash
# The hub's own Mosquitto configuration for the home's small sensors (ESP32 and the like), written by
# `install.sh --hub` and testable on its own (tests/test_hub_mosquitto.py starts Mosquitto with what it writes).
#
#   hub-mosquitto.sh --conf-dir DIR --secret-dir DIR [--port N] [--lan | --loopback] [--sensor NAME]...
#                    [--device DEVICE-ID]...
#                    [--bridge HOST:PORT --bridge-login USER --bridge-password-file FILE --bridge-ca FILE]
#
# Writes into --conf-dir: midgate-hub.conf (listener, logins required, the ACL), midgate-hub.passwd (hashed by
# mosquitto_passwd), midgate-hub.acl and midgate-hub.devices (the --device logins, one a line); into --secret-dir:
# agent.secret (the agent's password, for agent.toml's password_file), NAME.secret per --sensor (the password to
# flash into that sensor) and DEVICE-ID.secret per --device (for that device's agent.toml [[via_hub]] table: another
# midgate device at home whose messages the bridge carries to the MID). Passwords are made once, on
# this hub (never a default shared by every hub): a re-run keeps every login and adds only new ones, and keeps the
# listener where it was (--lan opens it to the home network, --loopback closes it again). With --bridge it also writes
# midgate-bridge.conf (from mosquitto-hub-bridge.conf beside this script) and a copy of the MID's CA, mid-ca.pem.
#
# Safe defaults, and why:
# - No anonymous client: anything on the network could otherwise feed the agent readings that end up in training.
# - The listener is on loopback unless --lan: the Pi may sit on a network that is not the member's (a shared house,
#   a guest Wi-Fi), and MQTT on port 1883 carries logins and readings in clear; opening it is the member's choice.
# - Each sensor has its own login and may publish (and subscribe) only under sensors/NAME/: a sensor cannot pass
#   for another, nor write to any other topic, in particular the mid/ topics the bridge forwards; only the agent's
#   login reads all of sensors/#. Readings are never bridged: they stay on the hub, as every sample does.
# - A midgate device's login (its device id, from `midgate agent status` on it) writes only its own mid/+/dev/ID/up/
#   topics and reads its own down/ topics, the MID's broadcasts and checkpoints: what the bridge carries for it. The
#   MID's broker holds the bridge's relay login to the member's devices as well, and checks every report's signature.
set -euo pipefail

conf_dir=""
secret_dir=""
port=1883
lan=""
sensors=()
devices=()
bridge=""
bridge_login=""
bridge_password_file=""
bridge_ca=""
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "hub-mosquitto.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --conf-dir) conf_dir=${2:?--conf-dir needs a folder}; shift ;;
    --secret-dir) secret_dir=${2:?--secret-dir needs a folder}; shift ;;
    --port) port=${2:?--port needs a number}; shift ;;
    --lan) lan=1 ;;
    --loopback) lan=0 ;;
    --sensor) sensors+=("${2:?--sensor needs a name}"); shift ;;
    --device) devices+=("${2:?--device needs a device id}"); shift ;;
    --bridge) bridge=${2:?--bridge needs HOST:PORT}; shift ;;
    --bridge-login) bridge_login=${2:?--bridge-login needs a user}; shift ;;
    --bridge-password-file) bridge_password_file=${2:?--bridge-password-file needs a file}; shift ;;
    --bridge-ca) bridge_ca=${2:?--bridge-ca needs a file}; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
if [ -z "$conf_dir" ] || [ -z "$secret_dir" ]; then die "--conf-dir and --secret-dir are required"; fi
if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then die "--port must be 1..65535"; fi
if [ -n "$bridge" ] && { [ -z "$bridge_login" ] || [ ! -f "$bridge_password_file" ] || [ ! -f "$bridge_ca" ]; }; then
  die "--bridge needs --bridge-login, --bridge-password-file FILE and --bridge-ca FILE (both files must exist)"
fi
for name in "${sensors[@]}"; do
  # The name is a login, a topic level and an agent.toml sensor name: lower case letters, digits, - and _.
  [[ $name =~ ^[a-z][a-z0-9_-]{0,31}$ ]] || die "sensor name $name: lower case letters, digits, - and _ (1-32)"
done
for device in "${devices[@]}"; do
  # A device id, as the MID gave it at enrolment (protocol/topics.py): it is the login and a topic level.
  [[ $device =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]] || die "device id $device: lower case letters, digits and - (1-63)"
done
for name in "${sensors[@]}" "${devices[@]}"; do
  [ "$name" != agent ] || die "agent: its password would be the agent's (agent.secret); choose another name"
done

AGENT_LOGIN=midgate-agent
PASSWD=$conf_dir/midgate-hub.passwd
ACL=$conf_dir/midgate-hub.acl
CONF=$conf_dir/midgate-hub.conf
DEVICES=$conf_dir/midgate-hub.devices

new_password() { head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='; }

# A login in the password file, made once: its password goes to SECRET (0600), the hash to the password file.
ensure_login() {
  local login=$1 secret=$2 password
  if [ -f "$PASSWD" ] && grep -q "^$login:" "$PASSWD" && [ -f "$secret" ]; then return 0; fi
  password=$(new_password)
  (umask 077; printf '%s\n' "$password" >"$secret")
  if [ -f "$PASSWD" ]; then
    mosquitto_passwd -b "$PASSWD" "$login" "$password"
  else
    (umask 027; mosquitto_passwd -c -b "$PASSWD" "$login" "$password")
  fi
}

write_acl() {
  cat >"$ACL.new" <<EOF
# Written by hub-mosquitto.sh (install.sh --hub). The agent reads every small sensor's readings; each sensor's login
# publishes (and reads its own commands, as Tasmota and Zigbee2MQTT do) only under sensors/<its login>/. No one else
# reads or writes anything.
user $AGENT_LOGIN
topic read sensors/#

pattern readwrite sensors/%u/#
EOF
  if [ -s "$DEVICES" ]; then
    printf '\n# midgate devices at home whose messages the bridge carries (--device): each its own topics only.\n' \
      >>"$ACL.new"
    while IFS= read -r device; do
      printf 'user %s\ntopic write mid/+/dev/%s/up/#\ntopic read mid/+/dev/%s/down/#\n' "$device" "$device" "$device"
      printf 'topic read mid/+/broadcast/#\ntopic read mid/+/ledger/checkpoint\n\n'
    done <"$DEVICES" >>"$ACL.new"
  fi
  chmod 0640 "$ACL.new"
  mv "$ACL.new" "$ACL"
}

write_conf() {
  local address=127.0.0.1
  if [ -z "$lan" ] && [ -f "$CONF" ] && grep -q '^listener [0-9]* 0\.0\.0\.0$' "$CONF"; then lan=1; fi
  if [ "$lan" = 1 ]; then address=0.0.0.0; fi
  cat >"$CONF.new" <<EOF
# The midgate hub's listener for the home's small sensors. Written by hub-mosquitto.sh (install.sh --hub); a re-run
# rewrites it. Logins: $PASSWD (mosquitto_passwd), topics: $ACL.
per_listener_settings false
allow_anonymous false
password_file $PASSWD
acl_file $ACL
listener $port $address
EOF
  chmod 0644 "$CONF.new"
  mv "$CONF.new" "$CONF"
}

# The bridge to the MID's broker over TLS, trusting only the MID's CA. Quoted replacements: bash 5.2 would otherwise
# read an & in the password as the matched text.
write_bridge() {
  local line password
  password=$(head -n 1 "$bridge_password_file")
  install -m 0640 "$bridge_ca" "$conf_dir/mid-ca.pem"
  (
    umask 027
    while IFS= read -r line; do
      line=${line//MID_BROKER/"$bridge"}
      line=${line//HUB_USERNAME/"$bridge_login"}
      line=${line//\/etc\/mosquitto\/midgate-hub/"$conf_dir"}
      printf '%s\n' "${line//HUB_PASSWORD/"$password"}"
    done <"$here/mosquitto-hub-bridge.conf" >"$conf_dir/midgate-bridge.conf.new"
  )
  mv "$conf_dir/midgate-bridge.conf.new" "$conf_dir/midgate-bridge.conf"
}

mkdir -p "$conf_dir" "$secret_dir"
ensure_login "$AGENT_LOGIN" "$secret_dir/agent.secret"
touch "$DEVICES"
for name in "${sensors[@]}"; do
  [ "$name" != "$AGENT_LOGIN" ] || die "$AGENT_LOGIN is the agent's login"
  ! grep -qx "$name" "$DEVICES" || die "$name is a device's login"
  ensure_login "$name" "$secret_dir/$name.secret"
done
# One login per name: a device id that is a sensor's login already would give that sensor the device's topics.
for device in "${devices[@]}"; do
  if grep -qx "$device" "$DEVICES"; then continue; fi
  ! { [ -f "$PASSWD" ] && grep -q "^$device:" "$PASSWD"; } || die "$device is a sensor's login"
  ensure_login "$device" "$secret_dir/$device.secret"
  printf '%s\n' "$device" >>"$DEVICES"
done
write_acl
write_conf
if [ -n "$bridge" ]; then write_bridge; fi
