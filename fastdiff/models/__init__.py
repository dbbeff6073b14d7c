"""Models built from fastdiff's fused layers: the ADM U-Net, LDM's KL autoencoder, ADM's noisy classifier."""
from fastdiff.models.autoencoder import AutoencoderKL, DiagonalGaussian
from fastdiff.models.classifier import NoisyClassifier
from fastdiff.models.unet import UNet

MODELS = {"UNet": UNet, "AutoencoderKL": AutoencoderKL, "NoisyClassifier": NoisyClassifier}

__all__ = ["UNet", "AutoencoderKL", "DiagonalGaussian", "NoisyClassifier", "MODELS"]
