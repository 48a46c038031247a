"""Mock twins of ID Quantique instruments."""
