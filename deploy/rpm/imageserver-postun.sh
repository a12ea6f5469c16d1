# imageserver .rpm, after erase ($1 = 0) or upgrade ($1 = 1): on upgrade, restart
# the daemon if it was running. Erasing keeps the images (/var/lib/imageserver)
# and a changed flags file (as .rpmsave); remove them by hand.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
    systemctl try-restart imageserver.service >/dev/null 2>&1 || :
fi
