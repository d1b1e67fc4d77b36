"""Adapters from torch tensors to the compiled (C++/CUDA) and Triton kernels."""
