"""fcnjax: semantic segmentation in JAX/Flax, exact to PyTorch.

Library modules, in the order data flows: config -> data -> models (built from ops) -> steps, losses, metrics,
optim -> training / evaluation / inference -> checkpoint, reporting. Entry points: `python -m fcnjax.train`,
`python -m fcnjax.evaluate`, `python -m fcnjax.predict`.

  seg = fcnjax.Segmenter.from_run("runs/quickstart")   # or Segmenter.from_weights(path, model="fcn_resnet50")
  labels = seg.predict("photo.png")                    # uint8 (H, W) class ids
"""


def __getattr__(name: str):
  # Imported on first use, so that `import fcnjax.ops` (or any submodule) does not load the training stack.
  if name == "Segmenter":
    from fcnjax.segmenter import Segmenter  # pylint: disable=g-import-not-at-top
    return Segmenter
  raise AttributeError(f"module 'fcnjax' has no attribute {name!r}")
