#!/usr/bin/env bash
# Certificates for a TLS SuperLink, and key pairs for SuperNode authentication.
#
#   scripts/make-certs.sh [OUT_DIR] [NUM_SUPERNODES] [SUPERLINK_HOST ...]
#
# OUT_DIR (default: certificates/) receives
#   ca.crt, ca.key                 a private certificate authority (keep ca.key offline)
#   superlink.crt, superlink.key   the SuperLink's server certificate, valid for localhost,
#                                  127.0.0.1, ::1 and every SUPERLINK_HOST given (names or IPs)
#   supernode-<i>, supernode-<i>.pub   ECDSA (P-384) SSH key pairs, i = 0..NUM_SUPERNODES-1 (default 2)
#
# SuperLink:  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt
#                              --ssl-keyfile superlink.key [--enable-supernode-auth]
# SuperNode:  flower-supernode --root-certificates ca.crt [--auth-supernode-private-key supernode-<i>]
# Register each node's public key (with --enable-supernode-auth):
#             flwr supernode register supernode-<i>.pub <superlink connection>
set -euo pipefail

out=${1:-certificates}
nodes=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
days=${CERT_DAYS:-365}

mkdir -p "$out"
cd "$out"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done

# The certificate authority.
openssl req -x509 -newkey rsa:4096 -sha256 -days "$days" -nodes \
  -keyout ca.key -out ca.crt -subj "/CN=fedtune federation CA" 2>/dev/null

# The SuperLink's key, a signing request, and the certificate the CA signs for it.
openssl req -newkey rsa:4096 -nodes -keyout superlink.key -out superlink.csr -subj "/CN=${1:-localhost}" 2>/dev/null
cat > superlink.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
EXT
openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out superlink.crt \
  -days "$days" -sha256 -extfile superlink.ext 2>/dev/null
rm -f superlink.csr superlink.ext ca.srl
chmod 600 ca.key superlink.key

# One authentication key pair per SuperNode.
for ((i = 0; i < nodes; i++)); do
  rm -f "supernode-$i" "supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtune-supernode-$i" -f "supernode-$i"
done

echo "wrote $(pwd): ca.crt, superlink.crt/.key (for $san), $nodes SuperNode key pair(s)"
