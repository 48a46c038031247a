"""Mock twins of Single Quantum instruments (SNSPD systems driven through WebSQ)."""
