# image-unpacker .rpm, after install ($1 = 1) or upgrade ($1 = 2): enable the
# unit on the first install without starting it. (On upgrade the old
# package's postun restarts a running daemon, as RPM orders scriptlets.)
install -d -m 0700 /var/lib/image-unpacker
if [ "$1" -eq 1 ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    systemctl enable image-unpacker.service >/dev/null 2>&1 || :
    cat <<'EOF'
image-unpacker is installed and enabled, but not started. Before starting it:
  - put the fleet's CA in /etc/ssl/CA.pem and this unpacker's certificate
    and key in /etc/ssl/image-unpacker/cert.pem and key.pem;
  - name the imageserver in /etc/sysconfig/image-unpacker (UNPACKER_ARGS);
then: systemctl start image-unpacker
EOF
fi
