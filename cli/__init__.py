"""The `sweep` command line, above `sweeps` (running), `analysis` (reading) and `diffusion_lib` (training)."""
