"""FCN-8s (VGG16 backbone) on Oxford-IIIT Pet, 3 classes: background, pet, border (the trimap's own classes).

  python -m fcnjax.train --config experiments/pet_fcn8s.py
With ImageNet weights (see conversions/README.md):
  python -m fcnjax.train --config experiments/pet_fcn8s.py --config.model.pretrained=weights/vgg16
"""
from fcnjax.config import base_config


def get_config():
  # experiments/pet_fcn16s.py and pet_fcn32s.py load this recipe and change the model's name alone.
  config = base_config(model=dict(name="fcn8s", num_classes=3, variant="paper"))
  config.data.source = "tfds_pet"
  config.data.pet_border = "class"       # 3 classes as in the Keras Pet tutorial
  config.data.crop_size = 320
  config.data.scale_range = (0.5, 2.0)
  config.data.eval_size = 320            # logits are resized back to each mask's original size for scoring
  config.data.workers = 2
  config.loss.name = "cross_entropy"
  # The paper's SGD (momentum, weight decay 5e-4); a mean-normalised loss takes a larger rate than its 1e-4/1e-10.
  config.optim.optimizer = "sgd"
  config.optim.learning_rate = 0.01
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "poly"
  config.train.batch_size = 16
  config.train.num_epochs = 30
  config.train.log_every = 20
  config.train.num_predictions = 8
  config.eval.batch_size = 16
  return config
