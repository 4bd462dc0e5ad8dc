"""Sample images during training, as kohya sd-scripts makes them.

* ``prompts``: read a ``--sample_prompts`` file (``.txt`` / ``.toml`` / ``.json``);
* ``samplers``: ``--sample_sampler`` names -> diffusers schedulers;
* ``naming``: ``<output_dir>/sample/<output_name>_<step>_<i>_<timestamp>[_<seed>].png``;
* ``png``: the PNG bytes with their text chunks, written atomically;
* ``guard``: RNG states and train/eval modes saved and restored around sampling;
* ``generate``: draw the images with the model being trained.

Importing this package (and ``prompts``/``naming``/``samplers``) loads no torch.
"""
