"""HyperAlign trainer: trains the hypernetwork of :mod:`hyperalign` on a frozen SD1.5, SDXL or FLUX base model.

Entry points (each ``python -m training.<name> --help``):

- ``training.train``          train a predictor (paper §4.3), resumable, 1..N GPUs and 1..M nodes
- ``training.keysteps``       P-mode keysteps from base-model trajectories (paper §4.2, Fig. 4)
- ``training.cache_latents``  encode the preferred images of the preference data once
- ``training.evaluate``       base model vs predictor (S, I, P): reward metrics, diversity, seconds per image
- ``training.export``         write the predictor file of any checkpoint

Every tool takes ``--config`` plus dotted overrides and ``--check`` (training/cli.py).

Words that mean one thing here: a *family* is the core's string ("sd15", "sdxl", "flux") and its *adapter* the
object wrapping a loaded base model (training/adapters.py); *sampling steps* are a rollout's timesteps
(``SamplingSteps``), *keysteps* P mode's steps, the *LR schedule* the optimizer's, *ddim* diffusers' DDIM scheduler;
to *export* is to write the predictor file ComfyUI loads (the node "Export LoRA" writes an ordinary LoRA instead).

Imports flow one way: ``training`` imports ``hyperalign``, never the ComfyUI nodes, and nothing in
``hyperalign`` or ``nodes`` imports ``training``.
"""
