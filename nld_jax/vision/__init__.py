"""The vision half of Nemotron-Labs-Diffusion-VLM: Pixtral tower, Mistral3 projector, Pillow
preprocessing, and the splice of image tokens into prompt embeddings."""

from nld_jax.vision.config import VisionConfig, is_vlm_config, vision_config_from_hf, vision_config_to_hf
from nld_jax.vision.features import image_features, pack_images, splice_embeddings, vision_tokens
from nld_jax.vision.params import VISION_PREFIXES, init_vision_params, vision_specs
from nld_jax.vision.preprocess import ImageError, image_token_layout, load_image, preprocess_image

__all__ = ["VisionConfig", "is_vlm_config", "vision_config_from_hf", "vision_config_to_hf", "image_features",
           "pack_images", "splice_embeddings", "vision_tokens", "VISION_PREFIXES", "init_vision_params",
           "vision_specs", "ImageError", "image_token_layout", "load_image", "preprocess_image"]
