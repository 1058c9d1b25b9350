"""rsip: hosts lease a gateway's public addresses and ports and tunnel through it (seed 002)."""
