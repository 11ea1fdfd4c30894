"""LR-ASPP on MobileNetV3-Large (torchvision's lraspp_mobilenet_v3_large) on the built-in synthetic shapes set.
No download; trains on a CPU.

  python -m fcnjax.train --config experiments/synthetic_lraspp.py
  python -m fcnjax.train --config experiments/synthetic_lraspp.py --config.model.pretrained=weights/mobilenet_v3_large

The trunk strides by 16 (its last stage dilated), so images are 128 pixels: an 8x8 high-level map and a 16x16
low-level one. With --config.model.pretrained pointing at converted ImageNet mobilenet_v3_large weights
(conversions/README.md), the trunk starts from them and the head from scratch (pretrained_scope 'backbone').
"""
from fcnjax.config import base_config


def get_config():
  config = base_config(model=dict(name="lraspp_mobilenet_v3_large", num_classes=5))
  config.data.source = "synthetic"
  config.data.num_classes = 5            # background, circle, rectangle, triangle, cross
  config.data.image_size = 128
  config.data.synthetic_train_examples = 2048
  config.data.synthetic_val_examples = 256
  config.data.hflip = True
  config.loss.name = "cross_entropy"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 50
  config.model.pretrained_scope = "backbone"
  config.train.batch_size = 16
  config.train.num_epochs = 4
  config.train.log_every = 16
  config.train.num_predictions = 8
  config.eval.batch_size = 32
  return config
