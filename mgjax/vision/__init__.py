"""The two vision towers: CLIP ViT (low resolution) and ConvNeXt (high resolution)."""
