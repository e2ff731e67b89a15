"""The fleet layer of ``unet-bag label-many``: many bags on Ray, above the one-bag tool (``tools/bag.py``).

``plan``: which bags, where their outputs go, what a run reports (no Ray). ``worker``: the Ray actors that label
one bag each with ``tools.bag.label_bag``. ``driver``: the Ray session and the loop that hands bags to workers.
Imports point one way: ``tools/bag_cli.py`` -> ``fleet`` -> ``tools/bag.py``.
"""
