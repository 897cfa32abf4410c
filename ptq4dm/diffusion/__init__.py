from ptq4dm.diffusion.sampler import SAMPLERS, Sampler, seeded_generators

__all__ = ["SAMPLERS", "Sampler", "seeded_generators"]
