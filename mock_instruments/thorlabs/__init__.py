"""Mock twins of Thorlabs instruments."""
