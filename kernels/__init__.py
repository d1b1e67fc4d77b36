"""Triton kernels shipped as airtrace.kernels."""
