"""The embedded default: a small masked image dataset with a planted shortcut, a small CNN, and
``fullgrad demo`` that runs the Beam job and the audit on them.

- :mod:`fullgrad.demo.data`: the dataset (Parquet with PNG images and masks);
- :mod:`fullgrad.demo.model`: the conv-BN-ReLU CNN and its training;
- :mod:`fullgrad.demo.command`: ``fullgrad demo --output DIR``.

Example:
    $ fullgrad demo --output demo-output
"""
