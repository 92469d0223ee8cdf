"""The data side of training: Fashion-MNIST, CIFAR-10/100 and ImageNet-style folders as loaders.

    data = build_data(cfg.data, device, seed)
    for epoch in range(start, epochs):
        data.train.set_epoch(epoch)
        for images, labels in data.train: ...   # float32 normalized NCHW and int64, on `device`

The training order and augmentation of epoch e depend only on (seed, e); the validation split
(carved from the training files, stratified) and any training subset depend on nothing but the data
set, so every run of a sweep shares them. Problems raise DataError, whose message says what to do.
"""
from ablate.data.build import BUILDERS, Data, as_data_conf, build_data
from ablate.data.config import DataConf
from ablate.data.errors import DataError
from ablate.data.folder import FolderLoader
from ablate.data.memory import TensorLoader
from ablate.data.split import SPLIT_SEED, stratified_split

__all__ = ["build_data", "Data", "DataConf", "DataError", "TensorLoader", "FolderLoader", "BUILDERS",
           "as_data_conf", "SPLIT_SEED", "stratified_split"]
