"""U-Net on the ISBI 2012 EM membranes (the U-Net paper's data set) with the paper's tricks: elastic deformation,
flips and 90-degree rotations, the border weight map in a BCE loss, overlap-tile evaluation.

  python -m fcnjax.train --config experiments/isbi_unet.py --workdir runs/isbi_unet
  python -m fcnjax.evaluate --workdir runs/isbi_unet --tile 256 --tta d4

Data: data.root, by default ../shared/data/isbi2012-em relative to the working directory (24 slices beside the
repository); elsewhere pass --config.data.root=DIR, DIR holding images/NN.png + masks/NN.png (512x512 grey; mask
255 = cell interior -> foreground 1, 0 = membrane; the README's Data section says how to unpack the challenge's
stack so). Sorted by name, the last val_count = 4 slices (20-23) validate and 00-19 train.
Sized to train on a 2-core CPU in under an hour; docs/isbi.md has the runs behind the numbers.
"""
from fcnjax.config import base_config


def get_config():
  config = base_config(model=dict(name="unet", num_classes=1, base_width=32, depth=4, upsampling="transpose"))
  config.data.source = "folder"
  config.data.root = "../shared/data/isbi2012-em"
  config.data.layout = "images_masks"
  config.data.mask_mode = "binary"
  config.data.binary = True
  config.data.val_count = 4
  config.data.crop_size = 256         # random 256^2 crops of the 512^2 slices; evaluation is on whole slices
  config.data.eval_size = 0           # native 512x512
  config.data.hflip = True
  config.data.vflip = True
  config.data.rot90 = True            # with the flips: all 8 symmetries of the square, EM has no orientation
  config.data.elastic = True
  config.data.elastic_sigma = 10.0    # paper: 3x3 grid, 10-pixel displacements
  config.data.elastic_grid_points = 3
  config.data.border_weight = True
  config.data.border_w0 = 3.0         # paper: 10, which thickens predicted membranes here; see docs/isbi.md
  config.data.border_sigma = 5.0
  config.data.border_class_weights = (1.0, 1.0)  # no class balancing: the border term already up-weights membranes
  config.loss.name = "bce"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 50
  config.train.batch_size = 4
  config.train.num_steps = 2000       # 8,000 crops of 256^2: 45 minutes on 2 CPU cores (docs/isbi.md)
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.num_predictions = 4
  config.eval.batch_size = 4
  return config
