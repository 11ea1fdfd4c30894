"""segmentation_models_pytorch's usual fine-tuning on Oxford-IIIT Pet, 3 classes: smp.Unet("resnet34") from an
ImageNet encoder, Adam at 1e-4, cross-entropy + Dice.

The encoder starts from torchvision's ImageNet ResNet-34 (see conversions/README.md):
  python conversions/convert_torchvision.py --arch smp_encoder --pth resnet34-b627a593.pth --out weights/resnet34
  python -m fcnjax.train --config experiments/pet_unet_resnet34.py
(--config.model.pretrained='' trains from scratch.)
"""
from fcnjax.config import base_config


def get_config():
  config = base_config(model=dict(name="smp_unet", encoder="resnet34", in_channels=3, num_classes=3))
  # The encoder loads by path; the decoder and the class-dependent head stay at smp's initialisation.
  config.model.pretrained = "weights/resnet34"
  config.model.pretrained_scope = "backbone"
  config.data.source = "tfds_pet"
  config.data.pet_border = "class"
  config.data.crop_size = 256          # divisible by 32: every encoder stage halves it exactly
  config.data.scale_range = (0.5, 2.0)
  config.data.eval_size = 256
  config.data.workers = 2
  # smp's DiceLoss(mode='multiclass') is tversky at alpha = beta = 0.5 (its defaults; fcnjax's 'dice' differs on
  # classes absent from a batch), added to cross-entropy with weight 1.
  config.loss.name = "ce+tversky"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-4
  config.optim.schedule = "cosine"
  config.train.batch_size = 16
  config.train.num_epochs = 30
  config.train.log_every = 20
  config.train.num_predictions = 8
  config.eval.batch_size = 16
  return config
