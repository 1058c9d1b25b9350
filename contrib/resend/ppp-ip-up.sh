#!/bin/sh
# /etc/ppp/ip-up.d/ip_resend — tell ip_resend the address IPCP just assigned.
# pppd passes: $1 interface, $2 tty, $3 speed, $4 local address, $5 remote address, $6 ipparam.
# ip_resend resends the packets that triggered dialing with this address as their source.
# Put this at the very end of ip-up (or in ip-up.d, which runs last on Debian).
[ -n "$1" ] && [ -n "$4" ] || exit 0
command -v ip_resend_wakeup >/dev/null 2>&1 || exit 0
# IPv6: pppd's IPV6CP only negotiates link-local identifiers; if your setup knows the global
# address at this point, export it as IPLOCAL6 (the ipshift lab's dial-up emulator does) and
# packets of both families are resent. Otherwise send a second wakeup once it is known.
addrs="$4"
[ -n "${IPLOCAL6:-}" ] && addrs="$addrs $IPLOCAL6"
ip_resend_wakeup -m "$addrs" -o "$1" || true
