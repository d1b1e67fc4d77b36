"""The kernels layer: one module per op (checks, float64 reference, ``torch.ops.airtrace`` op, dispatch), the backend
registry and the hash; imports only ``airtrace.util`` and the compiled/Triton kernels.

The ops themselves are reached as ``airtrace.<op>`` or ``airtrace.ops.<op>.<op>``; importing an op's
module registers ``torch.ops.airtrace.<op>``.
"""
