"""The toy world's factory: ``python -m toyworld.factory.build`` makes every asset in toyworld/assets.

Offline and slow (see toyworld/README.md); nothing at run time imports it. The stages: renders, the latent codec
(codec), the reward models (scorers), the UNet (diffusion), the rewards' second round on the UNet's own samples
(grounding), the preference pairs (prefs), the model folder and grid (publish) and the build report (base_report).
"""
