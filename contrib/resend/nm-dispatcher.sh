#!/bin/sh
# /etc/NetworkManager/dispatcher.d/50-ip_resend — NetworkManager's counterpart of ip-up/ip-down.
# NM calls dispatcher scripts with $1 interface and $2 action; for PPP connections the
# addresses are in IP4_ADDRESS_0 ("ADDR/PREFIX GATEWAY") and IP6_ADDRESS_0.
IFACE="$1"
ACTION="$2"
command -v ip_resend_wakeup >/dev/null 2>&1 || exit 0
case "$IFACE" in ppp*|wwan*|isdn*) ;; *) exit 0 ;; esac
case "$ACTION" in
    up|vpn-up)
        addrs="${IP4_ADDRESS_0%%/*}"
        [ -n "$IP6_ADDRESS_0" ] && addrs="$addrs ${IP6_ADDRESS_0%%/*}"
        [ -n "$addrs" ] && ip_resend_wakeup -m "$addrs" -o "$IFACE" || true
        ;;
    down|vpn-down)
        ip_resend_wakeup -m stop -o "$IFACE" >/dev/null 2>&1 || true
        ;;
esac
exit 0
