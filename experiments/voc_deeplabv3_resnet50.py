"""torchvision's DeepLabV3-ResNet50 recipe on PASCAL VOC 2012 (21 classes): aux loss 0.5, SGD momentum 0.9, weight
decay 1e-4, lr 0.02 for batch 16 (torchvision: 0.02 at 8 GPUs x 4), poly schedule (power 0.9), random resize 260-1040
then crop 480 and flip; evaluation at 520 resized back to each mask's size. The same recipe as
voc_fcn_resnet50.py; only the head differs.

  python -m fcnjax.train --config experiments/voc_deeplabv3_resnet50.py --config.data.root=/path/to/VOCdevkit/VOC2012 \
      --config.model.pretrained=weights/resnet50
"""
from fcnjax.config import base_config


def get_config():
  config = base_config(model=dict(name="deeplabv3_resnet50", num_classes=21, aux_loss=True))
  config.data.source = "folder"
  config.data.layout = "voc"
  config.data.root = ""
  config.data.num_classes = 21
  config.data.crop_size = 480
  config.data.scale_range = (0.5, 2.0)   # of VOC's ~500-pixel images: about torchvision's 260..1040
  config.data.eval_size = 520
  config.data.workers = 4
  config.loss.name = "cross_entropy"
  config.loss.aux_weight = 0.5
  config.optim.optimizer = "sgd"
  config.optim.learning_rate = 0.02
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.schedule = "poly"
  config.optim.poly_power = 0.9
  config.model.pretrained_scope = "backbone"
  config.train.batch_size = 16
  config.train.num_epochs = 30
  config.train.log_every = 20
  config.eval.batch_size = 8
  return config
