#!/usr/bin/env bash
# Install the midgate agent on a Raspberry Pi (Raspberry Pi OS / Debian, Python 3.11) or any Debian box.
# Usage: sudo ./install.sh [SOURCE_DIR]   (SOURCE_DIR defaults to the checkout this script lives in)
set -euo pipefail
src=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
[ "$(id -u)" = 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv i2c-tools >/dev/null

id midgate >/dev/null 2>&1 || useradd --system --home /var/lib/midgate --shell /usr/sbin/nologin midgate
getent group i2c >/dev/null && usermod -aG i2c midgate

install -d -m 0755 /opt/midgate /etc/midgate
install -d -m 0700 -o midgate -g midgate /var/lib/midgate
cp -a "$src"/. /opt/midgate/
cd /opt/midgate
python3 -m venv .venv
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
arch=$(uname -m)
if [ "$arch" = aarch64 ]; then .venv/bin/pip install -q "torch==2.9.1"; else .venv/bin/pip install -q "torch==2.13.0"; fi
.venv/bin/pip install -q .

if [ ! -f /etc/midgate/agent.toml ]; then
  install -m 0640 -g midgate deploy/raspberrypi/agent.example.toml /etc/midgate/agent.toml
  echo "edit /etc/midgate/agent.toml, then: sudo -u midgate /opt/midgate/.venv/bin/midgate agent enrol --mid URL --invite TOKEN"
fi
install -m 0644 deploy/raspberrypi/midgate-agent.service /etc/systemd/system/midgate-agent.service
systemctl daemon-reload
systemctl enable midgate-agent.service
echo "installed; start with: systemctl start midgate-agent"
