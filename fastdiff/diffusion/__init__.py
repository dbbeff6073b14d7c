"""Noise schedules, samplers, guidance and the sampling loop (one fused kernel per step, no host sync)."""
from fastdiff.diffusion.guidance import cfg_combine, classifier_grad
from fastdiff.diffusion.samplers import (SAMPLERS, CogVideoXDDIMSampler, CogVideoXDPMSampler, CosineDPMSolverSampler,
                                         DDIMInverseSampler, DDIMSampler, DDPMSampler, DEISSampler,
                                         DPMSolverMultistepInverseSampler, DPMSolverPPSampler, DPMSolverSDESampler,
                                         DPMSolverSinglestepSampler, EDMDPMSolverPPSampler, EDMEulerSampler,
                                         EulerAncestralSampler, EulerSampler, FlowMatchEulerSampler,
                                         FlowMatchHeunSampler, HeunSampler, KDPM2AncestralSampler, KDPM2Sampler,
                                         LCMSampler, LMSSampler, PNDMSampler, Sampler, TCDSampler, UniPCSampler,
                                         from_scheduler)
from fastdiff.diffusion.sampling import sample
from fastdiff.diffusion.schedules import NoiseSchedule, rescale_zero_terminal_snr

__all__ = ["NoiseSchedule", "rescale_zero_terminal_snr", "Sampler", "DDPMSampler", "DDIMSampler", "DDIMInverseSampler",
           "CogVideoXDDIMSampler", "CogVideoXDPMSampler", "EulerSampler", "EulerAncestralSampler", "HeunSampler",
           "KDPM2Sampler", "KDPM2AncestralSampler", "DPMSolverPPSampler", "DPMSolverSinglestepSampler",
           "DPMSolverSDESampler", "DPMSolverMultistepInverseSampler", "DEISSampler", "UniPCSampler", "PNDMSampler",
           "LMSSampler", "LCMSampler", "TCDSampler", "FlowMatchEulerSampler", "FlowMatchHeunSampler", "EDMEulerSampler",
           "EDMDPMSolverPPSampler", "CosineDPMSolverSampler", "SAMPLERS", "from_scheduler", "cfg_combine",
           "classifier_grad", "sample"]
