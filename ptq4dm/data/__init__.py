from ptq4dm.data.cifar10 import CIFAR10_CLASSES, DataNotFoundError, ImageTensorDataset, load_cifar10

__all__ = ["CIFAR10_CLASSES", "DataNotFoundError", "ImageTensorDataset", "load_cifar10"]
