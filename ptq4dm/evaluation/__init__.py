from ptq4dm.evaluation.sampling import SamplingModule, SeedDataModule, generate_images, load_shards

__all__ = ["SamplingModule", "SeedDataModule", "generate_images", "load_shards"]
