# image-unpacker .rpm, before erase ($1 = 0) or upgrade ($1 = 1): on erase, stop
# and disable the unit.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now image-unpacker.service >/dev/null 2>&1 || :
fi
