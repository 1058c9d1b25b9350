#!/bin/sh
# /etc/ppp/ip-down.d/ip_resend — the link went down while in demand mode.
# With a persistent daemon (systemd unit ip_resend@.service, `--persistent`) it re-arms by itself
# after each cycle and only needs to drop what it still maps; otherwise start a new one-shot
# instance for the next dial, as the original ip_resend did.
[ -n "$1" ] || exit 0
command -v ip_resend_wakeup >/dev/null 2>&1 || exit 0
if systemctl is-active --quiet "ip_resend@$1.service" 2>/dev/null; then
    ip_resend_wakeup -m stop -o "$1" || true
else
    # The seed's line. If the last instance still finishes its cycle (a TCP connection of the
    # dial lives on), it takes the next dial over and this one exits at once.
    ip_resend -o "$1" </dev/null >/dev/null 2>&1 &
fi
