"""FPGA-based QKD transmitter pattern generators (reference command set)."""
