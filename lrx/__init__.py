"""lrx: low-rank training research in JAX.

Subpackages (import them explicitly, e.g. ``import lrx.optim``):

- ``lrx.optim``    GaLore, FRUGAL, Fira as ``optax.GradientTransformation`` s.
- ``lrx.param``    low-rank and random-basis weight parameterizations.
- ``lrx.ssm``      S4 / S4D kernels with the DPLR (low-rank) correction.
- ``lrx.models``   flax models (LLaMA-style decoder, small GPT, S4 model).
- ``lrx.data``     deterministic, seedable corpora and synthetic tasks.
- ``lrx.analysis`` spectral diagnostics.
- ``lrx.train``    the shared training loop, checkpointing, metrics, sharding.
"""

__version__ = "0.1.0"
