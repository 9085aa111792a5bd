"""The Gaussian's tap features, shared by the kernels of every backend and :mod:`svconv.gaussian`.

For a tap at offset ``(u, v)`` from the window's centre, ``-q / 2 = eta . phi(u, v)`` with the
per-pixel parameters ``eta`` (see :mod:`svconv.gaussian`).
"""


def features(u, v, parts: int) -> list:
    """``phi`` of a tap at offset ``(u, v)`` from the window's centre: ``-q / 2 = eta . phi``
    for the isotropic (1), axis-aligned (2) and rotated (3) parameterisations."""
    if parts == 1:
        return [-(u * u + v * v) / 2]
    if parts == 2:
        return [-(u * u) / 2, -(v * v) / 2]
    return [-(u * u) / 2, u * v, -(v * v) / 2]
