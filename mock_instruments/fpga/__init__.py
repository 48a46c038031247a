"""Mock FPGA pattern generator."""
