"""fcnjax: semantic segmentation in JAX/Flax, exact to PyTorch.

Library modules, in the order data flows: config -> data -> models (built from ops) -> steps, losses, metrics,
optim -> training / evaluation / inference -> checkpoint, reporting. Entry points: `python -m fcnjax.train`,
`python -m fcnjax.evaluate`, `python -m fcnjax.predict`.
"""
