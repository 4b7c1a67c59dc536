"""Time the fast attribution path of *another* checkout of ircan-serve (``--baseline DIR``).

Run as a script by its file path, never imported: it puts the other checkout's root first on
``sys.path`` and imports *that* ``ircan_serve``, using only its public attribution API, then
times it as :func:`ircan_serve.benchmarks.attribution.attribution_worker` times this one
(warm-up, then seconds per example). Arguments: ROOT MODEL FILE K LAYERS_JSON N_STEPS OUT.npy;
prints ``{"seconds": ...}``.
"""

import json
import sys
import time


def main(argv: list[str]) -> None:
    root, model_spec, path, k, layers, n_steps, out = argv[:7]
    sys.path.insert(0, root)
    import numpy as np

    import ircan_serve
    from ircan_serve.attribution import ContextAwareIntegratedGradients
    from ircan_serve.config import AttributionConfig
    from ircan_serve.data import load_examples
    from ircan_serve.models import load_model

    if not ircan_serve.__file__.startswith(root):
        raise SystemExit(f"imported {ircan_serve.__file__}, not the checkout at {root}")
    lm = load_model(model_spec)
    examples = load_examples(path, limit=int(k), tokenizer=lm.tokenizer).examples
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    config = AttributionConfig(layers=json.loads(layers), n_steps=int(n_steps))
    ig.attribute(examples[0], config)
    t0 = time.perf_counter()
    scores = [ig.attribute(e, config).scores.numpy() for e in examples]
    seconds = (time.perf_counter() - t0) / len(examples)
    np.save(out, np.stack(scores))
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
