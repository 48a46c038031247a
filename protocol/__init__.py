"""Pure QKD post-processing math (numpy only, no instrument code)."""
