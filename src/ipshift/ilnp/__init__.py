"""ilnp: the Identifier-Locator Network Protocol as an overlay, with mobility, multihoming and
an application interface (seed 003, RFC 6740-6748)."""
