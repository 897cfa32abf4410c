from ptq4dm.diffusion.conditioning import Conditioning
from ptq4dm.diffusion.sampler import SAMPLERS, Sampler, seeded_generators

__all__ = ["SAMPLERS", "Conditioning", "Sampler", "seeded_generators"]
