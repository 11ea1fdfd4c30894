"""Data for fcnjax: sources (synthetic shapes, Oxford-IIIT Pet through tfds, folders), joint image/mask
transforms, and deterministic sharded batches.

  cfg = data.default_config()
  info = data.dataset_info(cfg)
  train = data.build_train_data(cfg, batch_size=B, seed=S, process_index=p, process_count=P)
  for batch in train.iterator(start_step): ...    # {'image': f32 (B/P, H, W, 3), 'mask': i32 (B/P, H, W)}
  evald = data.build_eval_data(cfg, split='validation', batch_size=B, process_index=p, process_count=P)
  for batch in evald: ...                         # + 'size' (original h, w) and 'valid'

Modules: config (keys and defaults), io (reading files), labels (mask values -> class ids), synthetic, tfds_pet,
folder (layouts), validate (the pass over files before training), sources (cfg -> examples), transforms, loader.
"""
from fcnjax.data.config import default_config, resolve
from fcnjax.data.folder import DataRootNotFoundError
from fcnjax.data.io import BadFileError, find_mask, list_images, read_image, read_mask
from fcnjax.data.loader import EvalData, TrainData, build_eval_data, build_train_data
from fcnjax.data.sources import DatasetInfo, dataset_info
from fcnjax.data.transforms import normalize, prepare_inference_image
from fcnjax.data.validate import BadFile

__all__ = [
    "BadFile", "BadFileError", "DataRootNotFoundError", "DatasetInfo", "EvalData", "TrainData", "build_eval_data",
    "build_train_data", "dataset_info", "default_config", "find_mask", "list_images", "normalize",
    "prepare_inference_image", "read_image", "read_mask", "resolve",
]
