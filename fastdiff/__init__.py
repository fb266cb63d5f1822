"""fastdiff: DDPM/DDIM training and sampling with a fused reverse-step kernel."""
__version__ = "0.1.0"
