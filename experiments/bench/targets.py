"""The design's performance targets (DESIGN.md, "Performance targets") as rows of a table: a
measured quantity, its target, and whether this run meets it. Rows without a target are shown
for information."""

from __future__ import annotations

MODES = ("fwd", "fwd+bwd")
# The XLA path must be the fastest XLA formulation on each platform (DESIGN: "impl='xla'").
FASTEST_XLA = "the XLA path should be the fastest XLA formulation"
COMPILE_LIMIT_S = 2.0


def fast_column(case: dict) -> str:
    """The column the targets are about: Pallas where it ran, else the XLA path."""
    ran = case["results"].get("fwd", {}).get("svconv pallas", {})
    return "svconv pallas" if "median_ms" in ran else "svconv xla"


def _ms(case: dict, mode: str, col: str, stat: str = "median_ms") -> float | None:
    return case["results"].get(mode, {}).get(col, {}).get(stat)


class _Rows:
    def __init__(self, quick: bool):
        self.quick, self.rows = quick, []

    def add(self, name, num, den, target, kind, note=""):
        """``num / den`` (``den=1`` for a plain quantity) against ``kind target`` (``"<="``,
        ``">="``; ``None``: for information)."""
        if self.quick:  # the targets are for the design's shapes, not the smoke test's
            kind, note = None, "quick shapes, no target"
        value = None if num is None or den is None else num / den
        met = None
        if value is not None and kind is not None:
            met = value <= target if kind == "<=" else value >= target
        self.rows.append(
            {
                "ratio": name,
                "value": value,
                "target": None if kind is None else f"{kind} {target:g}",
                "met": met,
                "note": "not measured" if value is None and not note else note,
            }
        )


def compute_targets(
    cases: list[dict],
    backend: str,
    peaks: dict,
    compile_times: list[dict],
    *,
    quick: bool,
    stat: str = "median_ms",
) -> list[dict]:
    """Target rows from this run's medians (or another statistic of the samples, ``stat``).

    Args:
      cases: case records (``Case.spec()`` plus ``results[mode][column]`` statistics).
      backend: ``"gpu"`` or another JAX backend name (the CPU targets apply).
      peaks: ``stream`` (``gb_per_s``) and ``matmul`` (dtype -> ``tflop_per_s``).
      compile_times: records of ``op``, ``id``, ``fwd_s`` and ``grad_s`` (``None``: failed).
      quick: smoke-test shapes: every row for information only.
      stat: the statistic of each column's samples that the ratios use.
    """
    gpu = backend == "gpu"
    t = _Rows(quick)

    def get(case, mode, col):
        return _ms(case, mode, col, stat)

    def per_mode(case, top, bottom, target, kind, note=""):
        """A row per mode: column ``top``'s time over column ``bottom``'s (the columns name the
        rows: ``svconv xla`` / ``svconv pallas`` for svconv's)."""
        for mode in MODES:
            t.add(
                f"{case['id']}: {mode}, {top} / {bottom}",
                get(case, mode, top),
                get(case, mode, bottom),
                target,
                kind,
                note,
            )

    stream = peaks.get("stream", {}).get("gb_per_s")
    for c in cases:
        cid, fast = c["id"], fast_column(c)
        tag = fast.removeprefix("svconv ")
        if c["op"] == "modulated":
            for mode, (g_lim, c_lim) in zip(MODES, ((1.25, 1.5), (1.6, 2.5)), strict=True):
                t.add(
                    f"{cid}: {mode}, svconv {tag} / lax conv",
                    get(c, mode, fast),
                    get(c, mode, "lax conv"),
                    g_lim if gpu else c_lim,
                    "<=",
                )
            per_mode(c, "torch unfold", fast, 5 if gpu else 2.5, ">=")
            if gpu:
                per_mode(c, "deform_conv2d", fast, 5, ">=")
            per_mode(c, "xla patches", fast, 10 if gpu else 1, ">=", "" if gpu else FASTEST_XLA)
            peak = peaks.get("matmul", {}).get(c["dtype"], {}).get("tflop_per_s")
            ms = get(c, "fwd", fast)
            rate = None if ms is None else c["flops"] / (ms * 1e-3) / 1e12
            t.add(f"{cid}: fwd, svconv {tag} TFLOP/s / matmul TFLOP/s", rate, peak, 0, None)
        elif c["op"] == "pixel":
            if c["k"] == 7 and not gpu:
                t.add(
                    f"{cid}: fwd, torch unfold / svconv {tag}",
                    get(c, "fwd", "torch unfold"),
                    get(c, "fwd", fast),
                    50,
                    ">=",
                )
                t.add(
                    f"{cid}: fwd+bwd, torch unfold / svconv {tag}",
                    get(c, "fwd+bwd", "torch unfold"),
                    get(c, "fwd+bwd", fast),
                    0,
                    None,
                )
            t.add(
                f"{cid}: svconv {tag} fwd+bwd / fwd",
                get(c, "fwd+bwd", fast),
                get(c, "fwd", fast),
                4,
                None if gpu else "<=",
            )
            per_mode(c, "xla patches", fast, 1, ">=", FASTEST_XLA if tag == "xla" else "")
        elif c["op"] == "gaussian":
            explicit = "pixel_filter2d(x, gaussian_kernels(sigma, size))"
            per_mode(c, fast, "explicit kernels", 1 if gpu else 0.5, "<=", explicit)
            for mode in MODES:
                peak = {
                    col: c["results"].get(mode, {}).get(col, {}).get("peak_mib")
                    for col in (fast, "explicit kernels")
                }
                t.add(
                    f"{cid}: {mode}, svconv {tag} peak buffers / explicit kernels'",
                    peak[fast],
                    peak["explicit kernels"],
                    0.1,
                    None if gpu else "<=",
                    "XLA's planned buffers",
                )
        elif c["op"] == "deformable":
            per_mode(c, "deform_conv2d", fast, 5 if gpu else 2, ">=")
            if gpu:
                per_mode(c, "deform_conv2d", "svconv triton", 5, ">=")
        else:
            per_mode(c, "lax local", fast, 1, ">=", FASTEST_XLA if tag == "xla" else "")
        if c["op"] in ("pixel", "local", "gaussian") and stream:
            ms = get(c, "fwd", fast)
            gbs = None if ms is None else c["bytes"]["fwd"] / (ms * 1e-3) / 1e9
            t.add(
                f"{cid}: fwd, svconv {tag} GB/s / stream GB/s",
                gbs,
                stream,
                0.7,
                ">=" if gpu and c["op"] != "gaussian" else None,
            )
        if gpu and c["op"] == "modulated":
            # The Mosaic kernels' targets (tensor cores; f32 as TF32), and each gradient's
            # kernel against the plain conv's forward, for information.
            mosaic = "svconv mosaic"
            for mode, limit in (("fwd", 1.0 if c["dtype"] != "float32" else 1.1), ("fwd+bwd", 1.5)):
                t.add(
                    f"{cid}: {mode}, {mosaic} / lax conv",
                    get(c, mode, mosaic),
                    get(c, mode, "lax conv"),
                    limit,
                    "<=",
                )
        for mode in c["modes"]:
            if not mode.startswith("grad "):
                continue
            for col in (fast, "svconv mosaic") if gpu else (fast,):
                if get(c, mode, col) is None:
                    continue
                base = "lax conv" if c["op"] == "modulated" else col
                t.add(
                    f"{cid}: {mode}, {col} / {base} fwd",
                    get(c, mode, col),
                    get(c, "fwd", base),
                    0,
                    None,
                )
        if gpu and c["op"] in ("pixel", "local", "gaussian") and stream:
            ms = get(c, "fwd", "svconv mosaic")
            if ms is not None:
                t.add(
                    f"{cid}: fwd, svconv mosaic GB/s / stream GB/s",
                    c["bytes"]["fwd"] / (ms * 1e-3) / 1e9,
                    stream,
                    0.8,
                    ">=" if (c["op"], c["k"]) in (("pixel", 7), ("local", 3)) else None,
                )
            if c["op"] == "local":
                t.add(
                    f"{cid}: svconv mosaic fwd+bwd / fwd",
                    get(c, "fwd+bwd", "svconv mosaic"),
                    ms,
                    2.5,
                    "<=",
                )
        # (local's weights, and their gradient, outweigh its patches; the Gaussian's memory
        # has rows of its own)
        if c["op"] in ("modulated", "pixel"):
            temp = c["results"].get("fwd+bwd", {}).get(fast, {}).get("temp_mib")
            t.add(
                f"{cid}: fwd+bwd, svconv {tag} temporary buffers / patch tensor",
                temp,
                c["patch_bytes"] / 2**20,
                1,
                "<=",
                "no kh*kw-times patch tensor",
            )
    for r in compile_times:
        for what, key in (("forward", "fwd_s"), ("value and gradient", "grad_s")):
            note = r.get("error", "")
            if key in r.get("stopped", ()):
                note = f"stopped at {r[key]:g} s: at least that"
            elif key == "grad_s" and "fwd_s" in r.get("stopped", ()):
                note = "not measured: the forward's compile was stopped"
            t.add(
                f"compile {r['id']}, {r['impl']}: {what}, s",
                r.get(key),
                1,
                COMPILE_LIMIT_S,
                None if gpu else "<=",
                note,
            )
    return t.rows
