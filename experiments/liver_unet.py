"""Binary U-Net on liver CT slices in the layout of the liver tutorial (train/ and val/ folders of NNN.png and
NNN_mask.png, mask 0/255), BCE loss and Adam as in that tutorial.

  python -m fcnjax.train --config experiments/liver_unet.py --config.data.root=/path/to/data
(A one-pair sample of that layout is in ../shared/data/liver-sample.)
"""
from fcnjax.config import base_config


def get_config():
  config = base_config(model=dict(name="unet", num_classes=1, base_width=64, depth=4, upsampling="transpose"))
  config.data.source = "folder"
  config.data.root = "../shared/data/liver-sample"
  config.data.layout = "liver"
  config.data.mask_mode = "binary"
  config.data.binary = True
  config.data.crop_size = 512
  config.data.eval_size = 512
  config.data.hflip = True
  config.data.vflip = True
  config.loss.name = "bce"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "constant"
  config.train.batch_size = 4
  config.train.num_epochs = 20
  config.train.log_every = 5
  config.train.num_predictions = 4
  config.eval.batch_size = 4
  return config
