"""resend: the dial-on-demand first-packet accelerator (ip_resend 0.3, and more)."""
