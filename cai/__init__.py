"""cai: Constitutional AI and RLHF training from recipes."""

__version__ = "0.1.0"
