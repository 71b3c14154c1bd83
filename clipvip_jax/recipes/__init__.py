"""Recipe parts that ship with the package: what configs/*.py share (common.py) and the demo's recipe (demo.py).

configs/ (the top-level folder of a checkout) holds one file per recipe, the files users pass to --config; each
states only what differs from the shared parts here. The demo finds its recipe in this package, so it runs from
an installed wheel as from a checkout.
"""
