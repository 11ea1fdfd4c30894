"""Train-mode BatchNorm + ReLU of a model, forward and backward, per layer shape: the gradient by differentiating
the two-pass formula (JAX's autodiff) against fcnjax's closed form (fcnjax.ops.batch_norm), and PyTorch's.

    python -m benchmarks.batch_norm [--model fcn_resnet50] [--batch 2] [--size 224] [--repeats 7]

The shapes are those of every BatchNorm the model's train-mode forward pass calls (recorded by flax's method
interception); each distinct shape is jitted alone as loss = sum(relu(bn(x)) * dy) with its gradients to x, scale
and bias, and timed as the median of --repeats after a warm-up; the totals weight each shape by how often it
occurs. PyTorch runs BatchNorm2d + ReLU forward and backward eagerly, channels-last, on the same threads.
"""
from __future__ import annotations

import argparse
import collections
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from fcnjax import models
from fcnjax.ops import BatchNorm
from fcnjax.ops.batch_norm import normalize_two_pass, normalize_with_batch_statistics


def batch_norm_shapes(model_name: str, batch: int, size: int) -> collections.Counter:
  """(input shape) -> how many of the model's BatchNorms see it in a train-mode forward pass."""
  model = models.build_model({"name": model_name, "num_classes": 21})
  shapes = collections.Counter()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
      shapes[tuple(args[0].shape)] += 1
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout":
                                                                                              jax.random.PRNGKey(0)}),
                   variables, images)
  return shapes


def _gradient_fn(normalize):
  def loss(x, scale, bias, dy):
    return jnp.sum(jax.nn.relu(normalize(x, scale, bias)) * dy)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="fcn_resnet50")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--threads", type=int, default=0,
                      help="CPU threads for both (0: every core this process may use)")
  args = parser.parse_args()
  threads = harness.pin_threads(args.threads)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)

  contenders = {"autodiff": _gradient_fn(lambda x, s, b: normalize_two_pass(x, s, b, 1e-5)[0]),
                "closed form": _gradient_fn(lambda x, s, b: normalize_with_batch_statistics(x, s, b, 1e-5)[0])}
  rng = np.random.default_rng(0)
  shapes = batch_norm_shapes(args.model, args.batch, args.size)
  totals = collections.defaultdict(float)
  print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, float32, {threads} threads, "
        f"{sum(shapes.values())} BatchNorms in {len(shapes)} shapes; ms per layer (forward + backward)")
  print("| shape | count | autodiff | closed form | torch |")
  print("|---|---|---|---|---|")
  for shape, count in sorted(shapes.items(), key=lambda item: -np.prod(item[0]) * item[1]):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    row = {}
    for name, fn in contenders.items():
      row[name] = harness.median_ms(lambda: jax.block_until_ready(fn(x, scale, bias, dy)), repeats=args.repeats)
    torch_bn = torch.nn.BatchNorm2d(shape[-1]).train()
    torch_x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).requires_grad_(True)
    torch_dy = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2)

    def torch_step():
      torch.autograd.grad(torch.relu(torch_bn(torch_x)), [torch_x, torch_bn.weight, torch_bn.bias], torch_dy)
    row["torch"] = harness.median_ms(torch_step, repeats=args.repeats)
    for name, ms in row.items():
      totals[name] += ms * count
    print(f"| {shape} | {count} | " + " | ".join(f"{row[name]:.2f}" for name in ("autodiff", "closed form", "torch"))
          + " |")
  print(f"| all | {sum(shapes.values())} | " + " | ".join(f"{totals[name]:.0f}" for name in
                                                          ("autodiff", "closed form", "torch")) + " |")


if __name__ == "__main__":
  main()
