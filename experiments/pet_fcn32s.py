"""FCN-32s on Oxford-IIIT Pet (the recipe of experiments/pet_fcn8s.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from pet_fcn8s import pet_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return pet_config("fcn32s")
