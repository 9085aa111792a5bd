"""Static checks of the GPU program, run on a machine without a GPU: each module lowers svconv's
public ops for CUDA under an abstract H100 and inspects the result; run one as
``python -m experiments.static.<name>``.

* :mod:`experiments.static.lowering`: lower a function for CUDA and read the Triton kernels out of
  the lowered module.
* :mod:`experiments.static.machine_code`: compile those kernels to sm_90 / sm_80 machine code with
  the ``triton`` package and report registers, spills, shared memory and tensor-core instructions.
* :mod:`experiments.static.traffic`: the HBM traffic of the arrays XLA builds around the kernels.
"""
