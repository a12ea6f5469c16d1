#!/bin/sh
# User data (cloud-init runs it once, as root, on first boot) that turns an
# instance launched from a base image into a working image-unpacker:
#
#   ami-publisher launch-instances BASE_AMI_OR_STREAM \
#       --user-data deploy/image-unpacker-user-data.sh \
#       --iam-instance-profile ImageUnpacker --security-group-search-tags Name=image-unpacker
#
# Edit the four settings below first. The instance needs:
#   - the fleet's CA, the unpackers' certificate and key (from `cargo xtask
#     pki` or your own CA) in SSM Parameter Store under SSM_PREFIX (ca.pem,
#     cert.pem as String, key.pem as SecureString), and an instance profile
#     allowed to read them (deploy/image-unpacker-instance-policy.json);
#     leave SSM_PREFIX empty when the base image already carries them;
#   - the image-unpacker binary: either already in the base image at
#     /usr/local/bin/image-unpacker, or at UNPACKER_URL (https) with its
#     SHA-256 in UNPACKER_SHA256 (an unverified binary is never installed);
#   - the AWS CLI when SSM_PREFIX is set; curl and sha256sum.
# It writes the systemd unit (identical to deploy/image-unpacker.service) and
# /etc/default/image-unpacker, then starts the daemon. Safe to run again.
# Progress and errors go to /var/log/cloud-init-output.log.

IMAGE_SERVER="imageserver.internal.example:6971"
SSM_PREFIX="/ami-fleet/image-unpacker"
UNPACKER_URL=""
UNPACKER_SHA256=""

set -eu
umask 022

log() { echo "image-unpacker bootstrap: $*" >&2; }
fail() {
    log "error: $*"
    exit 1
}

# Write stdin to $1 with mode $2, atomically (a failed write leaves no
# partial file behind).
put() {
    tmp=$(mktemp "$1.XXXXXX")
    if cat >"$tmp" && chmod "$2" "$tmp" && sync "$tmp" && mv -f "$tmp" "$1"; then
        return 0
    fi
    rm -f "$tmp"
    fail "could not write $1"
}

bin=/usr/local/bin/image-unpacker
if [ ! -x "$bin" ]; then
    [ -n "$UNPACKER_URL" ] || fail "$bin is not in the base image and UNPACKER_URL is empty"
    [ -n "$UNPACKER_SHA256" ] || fail "UNPACKER_SHA256 is empty: refusing to install an unverified binary"
    log "downloading $UNPACKER_URL"
    tmp=$(mktemp "$bin.XXXXXX")
    curl --fail --silent --show-error --location --proto '=https' --retry 5 -o "$tmp" "$UNPACKER_URL" ||
        { rm -f "$tmp"; fail "download of $UNPACKER_URL failed"; }
    echo "$UNPACKER_SHA256  $tmp" | sha256sum -c --status ||
        { rm -f "$tmp"; fail "$UNPACKER_URL does not have SHA-256 $UNPACKER_SHA256"; }
    chmod 0755 "$tmp"
    mv -f "$tmp" "$bin"
fi

if [ -n "$SSM_PREFIX" ]; then
    # IMDSv2 (launch-instances requires tokens) for the region.
    token=$(curl --fail --silent --retry 5 --retry-connrefused -X PUT \
        -H "X-aws-ec2-metadata-token-ttl-seconds: 300" \
        http://169.254.169.254/latest/api/token) || fail "no IMDSv2 token"
    region=$(curl --fail --silent --retry 5 --retry-connrefused -H "X-aws-ec2-metadata-token: $token" \
        http://169.254.169.254/latest/meta-data/placement/region) || fail "no region from IMDS"
    fetch() {
        value=$(aws --region "$region" ssm get-parameter --with-decryption --name "$SSM_PREFIX/$1" \
            --query Parameter.Value --output text) ||
            fail "reading SSM parameter $SSM_PREFIX/$1 (does the instance profile allow it?)"
        [ -n "$value" ] || fail "SSM parameter $SSM_PREFIX/$1 is empty"
        printf '%s\n' "$value" | put "$2" "$3"
    }
    mkdir -p /etc/ssl/image-unpacker
    fetch ca.pem /etc/ssl/CA.pem 0644
    fetch cert.pem /etc/ssl/image-unpacker/cert.pem 0644
    fetch key.pem /etc/ssl/image-unpacker/key.pem 0600
fi
for f in /etc/ssl/CA.pem /etc/ssl/image-unpacker/cert.pem /etc/ssl/image-unpacker/key.pem; do
    [ -s "$f" ] || fail "$f is missing or empty"
done

put /etc/default/image-unpacker 0644 <<EOF
# Written by the image-unpacker user data.
UNPACKER_ARGS="--image-server $IMAGE_SERVER --device-dir /dev/disk/by-id"
RUST_LOG=info
EOF

put /etc/systemd/system/image-unpacker.service 0644 <<'UNIT'
# image-unpacker: the agent on each unpacker instance (one per account and
# region). It writes raw EBS volumes, so it runs as root, but with only the
# capabilities and device classes that needs.
[Unit]
Description=image-unpacker: brings attached EBS volumes to image leaves
Documentation=https://github.com/ami-fleet/ami-fleet/blob/main/docs/operations.md
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
EnvironmentFile=-/etc/default/image-unpacker
ExecStart=/usr/local/bin/image-unpacker --state-dir /var/lib/image-unpacker $UNPACKER_ARGS
Restart=on-failure
RestartSec=2s
StateDirectory=image-unpacker
StateDirectoryMode=0700
# Devices: only disk-like block devices (NVMe namespaces are "blkext", Xen
# volumes "xvd"), read and write.
DevicePolicy=closed
DeviceAllow=block-blkext rw
DeviceAllow=block-xvd rw
DeviceAllow=block-sd rw
DeviceAllow=block-loop rw
CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# An unpack holds little memory whatever the image size (see docs/benchmarks.md).
MemoryMax=512M
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable image-unpacker.service
systemctl restart image-unpacker.service
log "image-unpacker is running; it reads images from $IMAGE_SERVER"
