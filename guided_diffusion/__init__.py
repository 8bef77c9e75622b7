"""DiffMix: diffusion-based data synthesis for nuclei segmentation and classification.

The package keeps the module and function names of openai/guided-diffusion and the SDM code
(``create_model_and_diffusion``, ``GaussianDiffusion``, ...) so existing scripts and checkpoints
carry over.
"""

__version__ = "0.1.0"
