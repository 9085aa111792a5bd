"""Benchmark: svconv against plain convolution, patch formulations and PyTorch, side by side.

For every case it times, in one run and interleaved round by round, the svconv XLA path, the
Pallas kernels (on a GPU), the XLA path's patch formulation (``conv_general_dilated_patches`` +
einsum, ``svconv.xla.*_forward_patches``) or ``lax.conv_general_dilated_local``,
``lax.conv_general_dilated`` on the same shape (cuDNN on a GPU: the floor for the modulated
conv), the reference (off the GPU), PyTorch unfold + matmul/einsum and torchvision's
``deform_conv2d`` (zero offsets, ``mask = d``) when they are available; forward, and
forward+backward (the gradient of ``sum(y * g)`` for a random cotangent ``g`` with respect to
every input). It measures the machine's peaks (stream bandwidth, a large matrix product) and
the compile time of every op and its gradient at 31x31, and checks the design's performance
targets. Writes ``results/bench-<device>.{json,md}``.

Run ``make bench`` or ``python -m experiments.bench`` (``--quick`` for a smoke test).

* :mod:`~experiments.bench.cases`: the cases, their FLOPs and fewest bytes;
* :mod:`~experiments.bench.columns`: the JAX columns;
* :mod:`~experiments.bench.torch_worker` / :mod:`~experiments.bench.torch_proxy`: the PyTorch
  columns, in a subprocess;
* :mod:`~experiments.bench.timing`: interleaved timing, peaks, compile time;
* :mod:`~experiments.bench.targets`: the targets table;
* :mod:`~experiments.bench.report`: Markdown and JSON.
"""
