"""diffusion_lib: a pure-PyTorch DDPM trainer with milestone metrics. It never imports Ray."""
