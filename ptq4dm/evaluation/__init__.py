from ptq4dm.evaluation.sampling import SamplingModule, generate_images

__all__ = ["SamplingModule", "generate_images"]
