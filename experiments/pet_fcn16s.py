"""FCN-16s on Oxford-IIIT Pet: the recipe of experiments/pet_fcn8s.py with the FCN-16s head."""
import pathlib

from fcnjax.config import load_config_file


def get_config():
  config = load_config_file(pathlib.Path(__file__).with_name("pet_fcn8s.py"))
  config.model.name = "fcn16s"
  return config
