"""Where units are scored: context-aware integrated gradients (IRCAN, Section 3.1).

* :mod:`.integrated_gradients`: the public class and the driver loop over examples;
* :mod:`.reference` and :mod:`.fast`: the two implementations (plain, and the product's path);
* :mod:`.quadrature`: the integration points (the paper's Riemann sum, or Gauss-Legendre);
* :mod:`.shared_prefix_attention`, :mod:`.prefix_cache`, :mod:`.replay`, :mod:`.hooks`,
  :mod:`.answer_probability`: the pieces the fast path is built from;
* :mod:`.store`: results on disk, resumable; :mod:`.ray`: the same examples over Ray actors.
"""

from .integrated_gradients import ContextAwareIntegratedGradients, attribute_examples
from .result import Attribution
from .store import STORE_VERSION, AttributionStore

__all__ = ["STORE_VERSION", "Attribution", "AttributionStore", "ContextAwareIntegratedGradients",
           "attribute_examples"]
