"""The C kernels of the CPU decode step and their one loader (``native``)."""
