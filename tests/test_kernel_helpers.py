"""The index arithmetic the kernels share, against brute force."""

import itertools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.triton import _common as cm


def _reaching(phase, pad, k, stride, dilation, big):
    """Brute force: ``{tap: output index}`` of the taps that reach input ``big * stride +
    phase`` (output ``i`` reads input ``i * stride + t * dilation - pad``)."""
    p = big * stride + phase
    found = {}
    for t in range(k):
        num = p + pad - t * dilation
        if num % stride == 0:
            found[t] = num // stride
    return found


_WINDOWS, _BIGS, _DILATIONS, _PADS = (1, 2, 3, 5), (0, 1, 2, 5), (1, 2, 3), (-5, -2, -1, 0, 1, 4)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_phase_taps_match_brute_force(stride):
    """Every stride phase, window and (negative: cropping) padding: the taps, in order, and the
    output pixel each reads, for input positions on both sides of the padding."""

    @jax.jit
    def table(phases):  # phases traced, as in the kernels
        out = {}
        for k, phase, dilation, pad in itertools.product(
            _WINDOWS, range(stride), _DILATIONS, _PADS
        ):
            taps = cm.phase_taps(phases[phase], pad, k, stride, dilation)
            ts = taps.first + jnp.arange(k) * taps.step
            outs = jnp.stack([b + taps.offset(ts) for b in _BIGS])
            out[k, phase, dilation, pad] = (taps.first, taps.count, ts, outs)
        return out

    results = table(jnp.arange(stride))
    for (k, phase, dilation, pad), (first, count, ts, outs) in results.items():
        count = int(count)
        got_taps = [int(t) for t in ts[:count]]
        for row, big in enumerate(_BIGS):
            want = _reaching(phase, pad, k, stride, dilation, big)
            assert got_taps == sorted(want), (k, phase, dilation, pad, big, got_taps, want)
            assert {t: int(outs[row, u]) for u, t in enumerate(got_taps)} == want
        if count == 0:
            assert int(first) >= k


def test_phase_loop_visits_every_pair_once():
    rows = cm.PhaseTaps(jnp.int32(1), jnp.int32(3), 2, lambda t: t)
    cols = cm.PhaseTaps(jnp.int32(0), jnp.int32(2), 3, lambda t: t)
    seen = cm.phase_loop(rows, cols, lambda m, n, acc: acc.at[m, n].add(1), jnp.zeros((8, 8)))
    want = jnp.zeros((8, 8)).at[jnp.array([1, 3, 5])[:, None], jnp.array([0, 3])[None]].set(1)
    assert (seen == want).all()
