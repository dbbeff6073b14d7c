"""Training: diffusion losses, the trainers (U-Net, noisy classifier, autoencoder), data, checkpoints, the CLI.

    from fastdiff.models import UNet
    from fastdiff.training import Trainer, digits

    data = digits(16)
    model = UNet(16, 1, 64, 1, 2, (8,), channel_mult=(1, 2), num_classes=10, learn_null_class=True)
    Trainer(model, data, steps=2000, lr=2e-4, cfg_dropout=0.1, out_dir="runs/digits", verbose=True).train()
"""
from fastdiff.training.checkpoint import load_autoencoder, load_model
from fastdiff.training.data import ImageFolder, TensorImageDataset, digits, load_dataset
from fastdiff.training.losses import (ImportanceSampler, UniformSampler, bits_per_dim, create_timestep_sampler,
                                      min_snr_weight, q_sample, training_losses)
from fastdiff.training.trainer import (AutoencoderTrainer, ClassifierTrainer, TrainConfig, Trainer,
                                       init_distributed)

__all__ = ["Trainer", "ClassifierTrainer", "AutoencoderTrainer", "TrainConfig", "init_distributed", "load_model",
           "load_autoencoder",
           "digits", "ImageFolder", "TensorImageDataset", "load_dataset", "training_losses", "bits_per_dim",
           "q_sample", "min_snr_weight", "UniformSampler", "ImportanceSampler", "create_timestep_sampler"]
