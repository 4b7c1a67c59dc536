"""``ircan bench``: speed and memory measured as ratios within one run, one module per benchmark.

Benchmarks never assert timings (tests check behaviour); they print what they measured. Each
benchmark module has ``add_arguments(parser)`` and ``main(namespace)``; :data:`BENCHMARKS` is
the table ``ircan bench`` dispatches on.
"""

from . import attribution, cad, eval, quadrature, ray, serve

BENCHMARKS = {
    "attribution": (attribution, "fast vs full-stack vs reference attribution on SmolLM2"),
    "cad": (cad, "served CAD (vLLM, top-K candidates) against transformers CAD: exact greedy tokens"),
    "eval": (eval, "CAD with KV caches vs naive CAD; last-position vs all-position scoring"),
    "quadrature": (quadrature, "Gauss-Legendre against the paper's Riemann sum: score errors, top units, selection"),
    "ray": (ray, "attribution in 1 process vs N Ray workers on the same rows"),
    "serve": (serve, "vLLM throughput/latency: patched vs base, wrapper vs raw client, CAD vs plain"),
}
