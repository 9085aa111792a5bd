"""Checks of the program svconv lowers for NVIDIA GPUs that run on a machine without one.

Each module lowers svconv's public ops for CUDA under an abstract H100 and inspects the result;
run one as ``python -m experiments.static.<name>``.
"""
