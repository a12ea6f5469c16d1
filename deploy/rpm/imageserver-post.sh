# imageserver .rpm, after install ($1 = 1) or upgrade ($1 = 2): enable the
# unit on the first install without starting it. (On upgrade the old
# package's postun restarts a running daemon, as RPM orders scriptlets.)
if [ "$1" -eq 1 ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    systemctl enable imageserver.service >/dev/null 2>&1 || :
    cat <<'EOF'
imageserver is installed and enabled, but not started. Before starting it:
  - put the fleet's CA in /etc/ssl/CA.pem and the server's certificate and
    key in /etc/ssl/imageserver/cert.pem and key.pem;
  - choose where images live in /etc/sysconfig/imageserver (IMAGESERVER_ARGS;
    /var/lib/imageserver unless --store names a bucket);
then: systemctl start imageserver
EOF
fi
