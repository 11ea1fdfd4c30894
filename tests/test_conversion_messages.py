"""The converter's messages name what is wrong: the one damaged tensor, a missing file, a file torch.save did not
write, an output that exists already (and the flag that replaces it)."""
import numpy as np
import pytest
import torch

from conftest import load_converter
from fcnjax.conversion import ConversionError, resnet


def _zeros_state_dict(layers) -> dict[str, np.ndarray]:
  return {key: np.zeros(shape, np.float32) for key, shape in resnet.expected_shapes(list(layers)).items()}


def _fcn_resnet50_state_dict(num_classes: int = 21) -> dict[str, np.ndarray]:
  layers = [*resnet.resnet_trunk_layers(50, "backbone.", ("backbone",)),
            *resnet.fcn_head_layers("classifier", "classifier", 2048, num_classes),
            *resnet.fcn_head_layers("aux_classifier", "aux_classifier", 1024, num_classes)]
  return _zeros_state_dict(layers)


def test_a_damaged_head_tensor_is_the_only_key_named():
  """classifier.4.weight transposed to (512, 21, 1, 1): the class count is the one the other head tensors agree on
  (21), so that tensor alone is reported, not the three that fit."""
  state_dict = _fcn_resnet50_state_dict()
  state_dict["classifier.4.weight"] = state_dict["classifier.4.weight"].reshape(512, 21, 1, 1)
  with pytest.raises(ConversionError) as error:
    resnet.convert_fcn_resnet50(state_dict, source="damaged.pth")
  message = str(error.value)
  assert "mis-shaped keys (1): classifier.4.weight: got (512, 21, 1, 1), expected (21, 512, 1, 1)" in message
  assert "classifier.4.bias" not in message and "missing" not in message and "unexpected" not in message


def test_the_class_count_follows_the_head():
  variables = resnet.convert_fcn_resnet50(_fcn_resnet50_state_dict(num_classes=3))
  assert variables["params"]["classifier"]["score"]["kernel"].shape == (1, 1, 512, 3)
  assert variables["params"]["aux_classifier"]["score"]["bias"].shape == (3,)


def test_files_that_are_missing_or_not_from_torch_save_and_an_existing_output(tmp_path, capsys):
  converter = load_converter()

  def run(*argv):
    return converter.main(list(argv)), capsys.readouterr().err

  missing = tmp_path / "missing.pth"
  assert run("--arch=resnet50", f"--pth={missing}", f"--out={tmp_path / 'a'}") == (
      1, f"error: {missing}: no such file\n")
  text = tmp_path / "notes.pth"
  text.write_text("these are not weights\n")
  code, err = run("--arch=resnet50", f"--pth={text}", f"--out={tmp_path / 'a'}")
  assert code == 1 and "not a file written by torch.save" in err and str(text) in err

  layers = [*resnet.resnet_trunk_layers(50, "", ("backbone",)), ("fc", ("fc",), "linear", (10, 2048))]
  pth = tmp_path / "resnet50.pth"
  torch.save({k: torch.from_numpy(v) for k, v in _zeros_state_dict(layers).items()}, pth)
  out = tmp_path / "converted"
  out.mkdir()
  (out / "keep.txt").write_text("saved work")
  code, err = run("--arch=resnet50", f"--pth={pth}", f"--out={out}")
  assert code == 1 and err == f"error: {out} already exists; add --overwrite to replace it\n"
  assert (out / "keep.txt").read_text() == "saved work"
