"""PyTorch twins of fcnjax's models (fcn.py, unet.py), the references of the parity tests and benchmarks."""
from __future__ import annotations

import torch


def randomize_batch_norm(model: torch.nn.Module, seed: int | torch.Generator | None = None, shift_std: float = 0.2,
                         var_range: tuple[float, float] = (0.5, 1.5)) -> torch.nn.Module:
  """Random BatchNorm scales U(0.5, 1.5), shifts and running means N(0, shift_std), running variances U(var_range),
  drawn in module order from a new generator seeded with `seed`, from `seed` itself when it is a torch.Generator
  (continuing its stream), or from torch's global generator when None.

  With the 1/0 defaults eval-mode BatchNorm is nearly the identity, and a mis-assigned statistic would go unnoticed.
  """
  generator = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0, shift_std, generator=generator)
        module.running_mean.normal_(0, shift_std, generator=generator)
        module.running_var.uniform_(*var_range, generator=generator)
  return model
