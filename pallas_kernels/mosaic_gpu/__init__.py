"""Pallas kernels on the Mosaic GPU backend (compute capability 9.0 and newer).

The per-pixel filters' window sweeps (``pixel``, ``gaussian``), built on :mod:`._sweep`: each
input row of a program's column strip is brought into shared memory once by a TMA copy, into a
ring of rows that the next output row's copies refill while this row is computed, and every tap
reads its window from there. The modulated conv (``modulated``) runs implicit GEMMs on the
tensor cores over the same ring; the locally connected conv (``local``) streams its
per-location weights through a multi-stage ring of TMA copies. Kernels take ``(*operands,
call)`` like the Triton ones; a case they cannot take is refused with a reason (each module's
``unsupported_reason``), and the caller runs the Triton kernels or XLA instead.

Not the default anywhere yet (:data:`DEFAULT_ON`): a GPU run must show them correct and faster
than the Triton kernels on a device class first (``make gpu-check``).
"""

# Device kinds (prefixes of ``device_kind``) where ``impl=None`` and ``impl="pallas"`` take the
# Mosaic kernels before the Triton ones.
DEFAULT_ON: tuple[str, ...] = ()

# The oldest compute capability the kernels are written for (TMA, Hopper's shared memory).
MIN_CAPABILITY = (9, 0)
