"""Pretrained variables: orbax save/load round trip, merge_pretrained's rules, and the converter CLI end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (a hard import: parity tests must run, never skip)
import torchvision  # noqa: E402

from conftest import CONVERTER, load_converter, run_python  # noqa: E402
from fcnjax.models.fcn import fcn8s  # noqa: E402
from fcnjax.models.fcn_resnet import fcn_resnet50  # noqa: E402
from fcnjax.models.resnet import resnet50  # noqa: E402
from fcnjax.models.unet import unet  # noqa: E402
from fcnjax.models.vgg import vgg16  # noqa: E402
from fcnjax.pretrained import load_variables, merge_pretrained, report_summary, save_variables  # noqa: E402
from torch_reference import randomize_batch_norm  # noqa: E402
from torch_reference.unet import UNet as TorchUNet, flax_variables  # noqa: E402


def leaves_by_path(tree):
  return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_tree(model, size=(1, 224, 224, 3), fill=None):
  """The model's variables as numpy arrays without running its initialisers (slow to compile on CPU).

  fill=None gives a distinct constant per leaf (its index), written as a broadcast view so that even VGG16's
  138M parameters cost no memory.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(size, jnp.float32))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  values = [np.broadcast_to(np.asarray(i + 1 if fill is None else fill, s.dtype), s.shape)
            for i, s in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, values)


# --------------------------------------------------------------------------------------------------------------------
# save / load


def test_round_trip_identical_arrays_and_outputs(tmp_path):
  variables = flax_variables(TorchUNet(2, 4, 2))
  variables["params"]["outc"]["bias"] = jnp.asarray(variables["params"]["outc"]["bias"])  # a device array too
  path = save_variables(tmp_path / "unet", variables)
  restored = load_variables(path)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(variables)
  for key, leaf in leaves_by_path(variables).items():
    got = leaves_by_path(restored)[key]
    assert isinstance(got, np.ndarray) and got.dtype == leaf.dtype, key
    np.testing.assert_array_equal(got, np.asarray(leaf), err_msg=key)
  model = unet(num_classes=2, base_width=4, depth=2)
  x = np.random.RandomState(0).randn(1, 12, 10, 3).astype(np.float32)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(restored, x)["out"], apply(variables, x)["out"])


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
  path = tmp_path / "v"
  save_variables(path, {"params": {"w": np.zeros(3, np.float32)}, "batch_stats": {}})
  with pytest.raises(FileExistsError, match="already exists"):
    save_variables(path, {"params": {"w": np.ones(3, np.float32)}})
  save_variables(path, {"params": {"w": np.ones(3, np.float32)}}, overwrite=True)
  np.testing.assert_array_equal(load_variables(path)["params"]["w"], np.ones(3))


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_variables(tmp_path / "nowhere")
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "file.txt").write_text("not a checkpoint")
  with pytest.raises(ValueError, match="junk"):
    load_variables(tmp_path / "junk")


# --------------------------------------------------------------------------------------------------------------------
# merge_pretrained


def small_tree(fill, classes=3, extra=None):
  tree = {"params": {"conv": {"kernel": np.full((3, 3, 2, 4), fill, np.float32), "bias": np.full(4, fill, np.float32)},
                     "head": {"kernel": np.full((1, 1, 4, classes), fill, np.float32),
                              "bias": np.full(classes, fill, np.float32)}},
          "batch_stats": {"bn": {"mean": np.full(4, fill, np.float32), "var": np.full(4, fill, np.float32)}}}
  if extra:
    tree["params"][extra] = {"kernel": np.full((2, 2), fill, np.float32)}
  return tree


def test_merge_copies_every_matching_leaf():
  init = jax.tree_util.tree_map(jnp.asarray, small_tree(0.0, extra="new_head"))
  merged, report = merge_pretrained(init, small_tree(1.0, extra="fc8"))
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(init)
  for key, leaf in leaves_by_path(merged).items():
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
    np.testing.assert_array_equal(leaf, 0.0 if "new_head" in key else 1.0, err_msg=key)
  assert report["unused"] == ["params/fc8/kernel"]
  assert report["left_at_init"] == ["params/new_head/kernel"]
  assert report["skipped"] == []
  assert len(report["loaded"]) == 6 and "batch_stats/bn/mean" in report["loaded"]


def test_shape_mismatch_names_every_path():
  with pytest.raises(ValueError) as error:
    merge_pretrained(small_tree(0.0, classes=3), small_tree(1.0, classes=21))
  message = str(error.value)
  assert "params/head/kernel: pretrained (1, 1, 4, 21), model (1, 1, 4, 3)" in message
  assert "params/head/bias: pretrained (21,), model (3,)" in message
  assert "params/conv" not in message


def test_nothing_matches_is_an_error():
  other = {"params": {"fc": {"kernel": np.ones((5, 5), np.float32)}}}
  with pytest.raises(ValueError, match="another model"):
    merge_pretrained(small_tree(0.0), other)
  with pytest.raises(ValueError, match="scope"):
    merge_pretrained(small_tree(0.0), small_tree(1.0), scope="head")


def test_backbone_scope_skips_layers_whose_shapes_differ():
  merged, report = merge_pretrained(small_tree(0.0, classes=3), small_tree(1.0, classes=21), scope="backbone")
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(merged["params"]["conv"]["kernel"], 1.0)
  np.testing.assert_array_equal(merged["batch_stats"]["bn"]["var"], 1.0)
  assert report["left_at_init"] == ["params/head/bias", "params/head/kernel"]
  assert [s.split(":")[0] for s in report["skipped"]] == ["params/head/bias", "params/head/kernel"]
  assert "skipped" in report_summary(report) and "left at init (2)" in report_summary(report)


def test_imagenet_vgg16_into_fcn8s():
  """fc8 (1000 ImageNet classes) is unused; the score and upscore layers of FCN-8s stay at init."""
  merged, report = merge_pretrained(shape_tree(fcn8s(num_classes=3), fill=0.0), shape_tree(vgg16()))
  assert report["unused"] == ["params/fc8/bias", "params/fc8/kernel"]
  assert {p.split("/")[1] for p in report["left_at_init"]} == {
      "score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore8"}
  assert {p.split("/")[1] for p in report["loaded"]} == {"features", "fc6", "fc7"}
  vgg_values = leaves_by_path(shape_tree(vgg16()))
  for key, leaf in leaves_by_path(merged).items():
    expected = vgg_values.get(key, 0.0)
    assert np.all(np.asarray(leaf) == expected), key


def test_coco_fcn_resnet50_into_a_three_class_model():
  init = shape_tree(fcn_resnet50(num_classes=3), fill=0.0)
  coco = shape_tree(fcn_resnet50(num_classes=21))
  with pytest.raises(ValueError) as error:
    merge_pretrained(init, coco)
  for path in ("params/classifier/score/kernel", "params/classifier/score/bias",
               "params/aux_classifier/score/kernel", "params/aux_classifier/score/bias"):
    assert path in str(error.value)
  merged, report = merge_pretrained(init, coco, scope="backbone")
  assert report["left_at_init"] == sorted(p.split(":")[0] for p in report["skipped"])
  assert {p.rsplit("/", 1)[0] for p in report["left_at_init"]} == {"params/classifier/score",
                                                               "params/aux_classifier/score"}
  assert report["unused"] == []
  # The heads' 3x3 conv and BatchNorm do not depend on the classes: they are loaded.
  assert np.all(np.asarray(merged["batch_stats"]["classifier"]["bn"]["mean"]) > 0)
  assert np.all(np.asarray(merged["params"]["classifier"]["score"]["kernel"]) == 0)


# --------------------------------------------------------------------------------------------------------------------
# conversions/convert_torchvision.py


@pytest.mark.slow
def test_cli_converts_resnet50_end_to_end(tmp_path):
  torch.manual_seed(0)
  # Non-trivial BatchNorm statistics, so that the conversion of every one of them matters.
  reference = randomize_batch_norm(torchvision.models.resnet50(weights=None), shift_std=0.1, var_range=(0.5, 1.5))
  pth = tmp_path / "resnet50-test.pth"
  torch.save(reference.state_dict(), pth)
  result = run_python(CONVERTER, "--arch", "resnet50", "--pth", pth, "--out", tmp_path / "resnet50")
  assert result.returncode == 0, result.stderr
  assert "320 tensors" in result.stdout and "25,557,032 values" in result.stdout
  assert str(tmp_path / "resnet50") in result.stdout

  variables = load_variables(tmp_path / "resnet50")
  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(x)).numpy()
  out = jax.jit(resnet50().apply)(variables, x.transpose(0, 2, 3, 1))["out"]
  scale = float(np.abs(expected).max())
  diff = float(np.abs(np.asarray(out) - expected).max())
  print(f"resnet50 via the CLI: max |diff| {diff:.3g} at logit scale {scale:.3g}")
  assert diff <= 1e-4 * max(scale, 1.0), f"max |diff| {diff:.3g} at logit scale {scale:.3g}"


def test_cli_rejects_a_state_dict_of_another_architecture(tmp_path, capsys):
  # In-process (the end-to-end test above covers the subprocess): main() returns the exit status.
  cli = load_converter()
  pth = tmp_path / "not-vgg.pth"
  torch.save(TorchUNet(2, 4, 1).state_dict(), pth)
  assert cli.main(["--arch", "vgg16", "--pth", str(pth), "--out", str(tmp_path / "out")]) == 1
  stderr = capsys.readouterr().err
  assert "missing keys" in stderr and "features.0.weight" in stderr
  assert "unexpected keys" in stderr and "inc.bn1.weight" in stderr
  assert not (tmp_path / "out").exists()
  (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
  assert cli.main(["--arch", "resnet50", "--pth", str(tmp_path / "garbage.pth"), "--out", str(tmp_path / "o")]) == 1
  assert "garbage.pth" in capsys.readouterr().err
