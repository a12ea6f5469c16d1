#!/bin/sh
# User data (cloud-init runs it once, as root, on first boot) that turns an
# instance launched from a base image into a working image-unpacker:
#
#   ami-publisher launch-instances BASE_AMI_OR_STREAM \
#       --user-data deploy/image-unpacker-user-data.sh \
#       --iam-instance-profile ImageUnpacker --security-group-search-tags Name=image-unpacker
#
# Edit the settings below first. The instance needs:
#   - the fleet's CA, the unpackers' certificate and key (from `cargo xtask
#     pki` or your own CA) in SSM Parameter Store under SSM_PREFIX (ca.pem,
#     cert.pem as String, key.pem as SecureString), and an instance profile
#     allowed to read them (deploy/image-unpacker-instance-policy.json);
#     leave SSM_PREFIX empty when the base image already carries them;
#   - the image-unpacker package (`cargo xtask package`), taken in this
#     order: already installed in the base image (nothing is downloaded);
#     from PACKAGE_URL (https; the .deb on Debian and Ubuntu, the .rpm on
#     Amazon Linux and RHEL) with its SHA-256 in PACKAGE_SHA256 (an
#     unverified package is never installed); else from a repository the
#     base image's apt or dnf already knows;
#   - the AWS CLI when SSM_PREFIX is set; curl and sha256sum.
# It installs the package (which brings the systemd unit, enabled but not
# started), writes the daemon's flags and certificates, then starts it.
# Safe to run again. Progress and errors go to
# /var/log/cloud-init-output.log.

IMAGE_SERVER="imageserver.internal.example:6971"
SSM_PREFIX="/ami-fleet/image-unpacker"
PACKAGE_URL=""
PACKAGE_SHA256=""

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

# The package family: apt with .deb files, or dnf (or yum) with .rpm files.
if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    family=deb
    installed() { dpkg-query -W -f '${Status}' image-unpacker 2>/dev/null | grep -q 'install ok installed'; }
    flags=/etc/default/image-unpacker
elif command -v rpm >/dev/null 2>&1; then
    family=rpm
    installed() { rpm -q image-unpacker >/dev/null 2>&1; }
    flags=/etc/sysconfig/image-unpacker
    dnf=$(command -v dnf || command -v yum) || fail "neither dnf nor yum is here"
else
    fail "neither apt nor rpm is here: install the image-unpacker package into the base image instead"
fi

if installed; then
    log "the image-unpacker package is already installed"
elif [ -n "$PACKAGE_URL" ]; then
    [ -n "$PACKAGE_SHA256" ] || fail "PACKAGE_SHA256 is empty: refusing to install an unverified package"
    pkg="$(mktemp -d)/image-unpacker.$family"
    log "downloading $PACKAGE_URL"
    curl --fail --silent --show-error --location --proto '=https' --retry 5 -o "$pkg" "$PACKAGE_URL" ||
        fail "download of $PACKAGE_URL failed"
    echo "$PACKAGE_SHA256  $pkg" | sha256sum -c --status ||
        fail "$PACKAGE_URL does not have SHA-256 $PACKAGE_SHA256"
    if [ "$family" = deb ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" || fail "apt-get could not install $pkg"
    else
        "$dnf" install -y -q "$pkg" || fail "$dnf could not install $pkg"
    fi
    rm -f "$pkg"
else
    log "installing image-unpacker from the configured repositories"
    if [ "$family" = deb ]; then
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q image-unpacker; } ||
            fail "apt-get could not install image-unpacker (set PACKAGE_URL, or add the repository to the base image)"
    else
        "$dnf" install -y -q image-unpacker ||
            fail "$dnf could not install image-unpacker (set PACKAGE_URL, or add the repository to the base image)"
    fi
fi
installed || fail "the image-unpacker package is not installed"

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

put "$flags" 0644 <<EOF
# Written by the image-unpacker user data.
UNPACKER_ARGS="--image-server $IMAGE_SERVER --device-dir /dev/disk/by-id"
RUST_LOG=info
EOF

systemctl daemon-reload
systemctl enable image-unpacker.service
systemctl restart image-unpacker.service
log "image-unpacker is running; it reads images from $IMAGE_SERVER"
