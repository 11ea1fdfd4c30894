"""U-Net (paper widths 64..1024, BatchNorm) on Oxford-IIIT Pet, 3 classes, Adam as in the Keras Pet tutorial."""
from fcnjax.config import base_config


def get_config():
  config = base_config(model=dict(name="unet", num_classes=3, base_width=64, depth=4, upsampling="transpose"))
  config.data.source = "tfds_pet"
  config.data.pet_border = "class"
  config.data.crop_size = 256
  config.data.scale_range = (0.5, 2.0)
  config.data.eval_size = 256
  config.data.workers = 2
  config.loss.name = "cross_entropy"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 200
  config.train.batch_size = 16
  config.train.num_epochs = 30
  config.train.log_every = 20
  config.train.num_predictions = 8
  config.eval.batch_size = 16
  return config
