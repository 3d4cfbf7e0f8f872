"""The NBD front end: `vdisk serve` makes images available to QEMU, libvirt and any other
NBD client (``-drive file=nbd://127.0.0.1:10809/NAME,format=raw``).

``protocol`` holds the wire format (from the NBD project's proto.md), ``server`` the trio
server that translates NBD commands into :class:`vdisk.api.Disk` calls.

Limits a client should know: requests of any alignment (minimum block size 1), READ and
WRITE payloads up to 32 MiB (larger ones get NBD_EINVAL, as qemu-nbd does), TRIM and
WRITE_ZEROES of any length, up to 64 requests in flight per connection, no TLS.
"""
