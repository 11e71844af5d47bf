#!/usr/bin/env bash
# Install and configure the bench's peer relay: Postfix + Cyrus SASL (sasldb) + OpenDKIM, from Debian.
#
#   bench/setup-peers.sh            install (apt-get) and configure; idempotent
#   bench/setup-peers.sh --restore  stop Postfix, put /etc/postfix back as it was before the first run
#
# What it leaves, for bench/postfix.py (which picks the ports and starts Postfix and OpenDKIM):
#   /etc/postfix/main.cf      submission-only relay: STARTTLS + SASL, in_flow_delay = 0, no local
#                             delivery, nothing chrooted (sasldb lives in /etc), relayhost set later
#   /etc/postfix/sasl/smtpd.conf   Debian's Postfix reads Cyrus' config only from this path
#   /etc/sasldb2              one user, app@bench.test, password in $STATE/postfix-password
#   $STATE/                   cert.pem/key.pem (ECDSA P-256), dkim.private (RSA-2048), ready marker
# Postfix is never left running by this script; it never touches anything but loopback.
set -euo pipefail

STATE=/var/lib/relaybox-bench
BACKUP="$STATE/etc-postfix.orig.tar"
SASLDB=/etc/sasldb2
SASLDB_BACKUP="$STATE/sasldb2.orig"
PACKAGES=(postfix opendkim opendkim-tools sasl2-bin libsasl2-modules)
HERE="$(cd "$(dirname "$0")" && pwd)"

[ "$(id -u)" -eq 0 ] || { echo "setup-peers.sh: must run as root (apt-get, /etc/postfix)" >&2; exit 1; }

restore() {
  if command -v postfix >/dev/null && postfix status >/dev/null 2>&1; then
    postfix stop >/dev/null 2>&1 || true
  fi
  if [ -f "$BACKUP" ]; then
    rm -rf /etc/postfix
    tar -C /etc -xpf "$BACKUP"
    echo "restored /etc/postfix from $BACKUP"
  fi
  if [ -f "$SASLDB_BACKUP" ]; then
    cp -p "$SASLDB_BACKUP" "$SASLDB"
  elif [ -f "$STATE/sasldb2.created" ]; then
    rm -f "$SASLDB"
  fi
  rm -f "$STATE/ready" "$STATE/sasldb2.created"
}

if [ "${1:-}" = "--restore" ]; then
  restore
  exit 0
fi

mkdir -p "$STATE"
chmod 0755 "$STATE"

# --- install ---------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  # "No configuration": the package must not write a main.cf of its own or start anything.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  echo "postfix postfix/mailname string bench.test" | debconf-set-selections
  if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
  echo "installed: ${missing[*]}"
fi

# --- back up what we are about to change (once: the first run's state is the original) ------------
if [ ! -f "$BACKUP" ]; then
  tar -C /etc -cpf "$BACKUP" postfix
  if [ -f "$SASLDB" ]; then cp -p "$SASLDB" "$SASLDB_BACKUP"; else touch "$STATE/sasldb2.created"; fi
  echo "backed up /etc/postfix to $BACKUP"
fi
# A failure half-way leaves the original in place.
trap 'echo "setup-peers.sh: failed; restoring /etc/postfix" >&2; restore' ERR

# --- secrets and keys ------------------------------------------------------------------------------
if [ ! -s "$STATE/postfix-password" ]; then
  (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$STATE/postfix-password")
fi
if [ ! -s "$STATE/cert.pem" ]; then
  python3 -c "import sys; sys.path.insert(0, '$HERE/..'); from pathlib import Path; \
from bench.common import make_cert; make_cert(Path('$STATE'), 'postfix.bench.test')"
fi
if [ ! -s "$STATE/dkim.private" ]; then
  opendkim-genkey -b 2048 -h sha256 -d bench.test -s bench -D "$STATE"
  mv "$STATE/bench.private" "$STATE/dkim.private"
  mv "$STATE/bench.txt" "$STATE/dkim.txt"
fi
chown opendkim:opendkim "$STATE/dkim.private"
chmod 0600 "$STATE/dkim.private"

# --- Postfix ---------------------------------------------------------------------------------------
cat >/etc/postfix/main.cf <<EOF
# Written by relaybox bench/setup-peers.sh; the original is in $BACKUP.
compatibility_level = 3.6
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
inet_interfaces = loopback-only
inet_protocols = ipv4
# Loopback is exempt from anvil's per-client limits, but relaying still needs SASL (no
# permit_mynetworks below): the load generator authenticates like any submission client.
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions =
smtpd_peername_lookup = no
in_flow_delay = 0
maillog_file = /var/log/postfix-bench.log
# STARTTLS (RFC 3207) with the same kind of certificate as relaybox, AUTH only after it.
smtpd_tls_cert_file = $STATE/cert.pem
smtpd_tls_key_file = $STATE/key.pem
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_security_options = noanonymous
# Out to the counting sink (bench/postfix.py sets relayhost to its port), in the clear like relaybox.
relayhost =
smtp_tls_security_level = none
smtp_dns_support_level = disabled
# OpenDKIM is attached per submission service in master.cf (-o smtpd_milters=...).
milter_default_action = tempfail
non_smtpd_milters =
EOF

mkdir -p /etc/postfix/sasl
cat >/etc/postfix/sasl/smtpd.conf <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: $SASLDB
EOF

# The login is app@bench.test: Cyrus splits the realm at '@' (smtpd_sasl_local_domain is empty).
saslpasswd2 -p -c -f "$SASLDB" -u bench.test app <"$STATE/postfix-password"
chown root:postfix "$SASLDB"
chmod 0640 "$SASLDB"

# Nothing chrooted: a chrooted smtpd cannot read /etc/sasldb2, and `postfix start` (unlike Debian's
# init script) does not copy /etc files into the chroot. Port 25 is not needed.
postconf -F '*/*/chroot = n'
postconf -MX smtp/inet 2>/dev/null || true
postfix check

trap - ERR
touch "$STATE/ready"
echo "postfix + opendkim configured; state in $STATE (undo: $0 --restore)"
