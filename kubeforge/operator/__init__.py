"""The kopf operator: `kubeforge operator` (or `kopf run -m kubeforge.operator.handlers`).

`handlers.py` only registers kopf handlers and translates; `plan.py` decides what the world
should look like and `manifests.py` writes the objects, both pure and unit-tested.
"""
