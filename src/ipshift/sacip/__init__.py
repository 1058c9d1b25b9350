"""sacip: established sessions survive a change of either end's address (seed 001)."""
